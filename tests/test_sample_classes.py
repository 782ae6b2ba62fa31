"""The sample stage keeps exactly `sample.num_samples` images at every acceptance rate, spread
over the classes drawn as evenly as can be, and draws only the classes `sample.classes` names
(the dataset's class names, or indices); a class the dataset lacks fails at once, naming it."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from storage.artifacts import artifact_key

from flows.parameters import sections_of
from storage.sources import IdxSource
from tasks.config import pipeline_config
from tasks.stages.ingest import DatasetManifest
from tasks.machinery.arrays import load_npz
from tasks.stages import BY_NAME, FinishedRun, stage_keys
from tasks.machinery.sampling_plan import SamplingPlan, resolve_classes
from tasks.stages.sample import STAGE as SAMPLE, SampleSettings, check_classes, load_samples, rate_key
from pipeline_helpers import artifacts, smoke_config

FASHION_CLASSES = list(IdxSource.__dataclass_fields__["class_names"].default)  # the real dataset's names
SNEAKER = FASHION_CLASSES.index("Sneaker")


def _dataset(class_names: list[str] = FASHION_CLASSES) -> DatasetManifest:
    """What the sample stage reads of a dataset: its class names."""
    return DatasetManifest.model_construct(class_names=class_names)


def _plan(dataset: DatasetManifest | None = None, **sample) -> SamplingPlan:
    overrides = sample.pop("overrides", {})
    settings = SampleSettings.of(pipeline_config("smoke", sample=sample, overrides=overrides))
    return settings.plan(dataset or _dataset())


def _selections(plan: SamplingPlan, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[float, np.ndarray]]:
    """Labels and judge scores of every candidate (drawn in batches of 7, as mapped batches
    would), and the indices each rate keeps."""
    labels = np.concatenate([plan.labels(first, min(7, plan.candidates - first))
                             for first in range(0, plan.candidates, 7)])
    scores = np.random.default_rng(seed).random(plan.candidates).astype(np.float32)
    return labels, scores, {rate: plan.kept(scores, labels, rate) for rate in plan.rates}


# --- exact counts --------------------------------------------------------------------------------


def test_sixteen_over_ten_classes_keeps_exactly_sixteen_at_every_rate():
    plan = _plan(num_samples=16)  # the smoke preset's rates: 1, 0.5, 0.25, 0.1
    assert plan.rates == (1.0, 0.5, 0.25, 0.1) and plan.classes == tuple(range(10))
    labels, scores, kept = _selections(plan)
    assert [len(plan.pool(rate)) for rate in plan.rates] == [16, 32, 64, 160] and plan.candidates == 160
    for rate, indices in kept.items():
        assert np.bincount(labels[indices], minlength=10).tolist() == [2, 2, 2, 2, 2, 2, 1, 1, 1, 1], rate
        assert len(set(indices.tolist())) == 16 and set(indices.tolist()) <= set(plan.pool(rate).tolist())
        # The classes interleave: the first kept of every class, then the second ones.
        assert labels[indices].tolist() == [*range(10), *range(6)]
        # Within its class, each kept candidate beats every rejected one of the pool.
        pool = plan.pool(rate)
        for label in range(10):
            mine = pool[labels[pool] == label]
            chosen = np.intersect1d(mine, indices)
            rejected = np.setdiff1d(mine, chosen)
            assert not len(rejected) or scores[chosen].min() >= scores[rejected].max()


@pytest.mark.parametrize("num_samples, classes", [(16, None), (7, None), (3, None), (10, None), (500, None),
                                                   (5, ["Bag", "Sneaker"]), (1, [3, 0, 9]), (33, ["Coat"])])
def test_num_samples_is_spread_evenly_the_first_classes_getting_the_extra_ones(num_samples, classes):
    plan = _plan(num_samples=num_samples, classes=classes, acceptance_rates=[0.3, 0.7])
    order = plan.classes
    labels, _, kept = _selections(plan)
    expected = [num_samples // len(order) + (i < num_samples % len(order)) for i in range(len(order))]
    assert plan.keep.tolist() == expected
    for rate, indices in kept.items():
        counts = np.bincount(labels[indices], minlength=10)
        assert [counts[c] for c in order] == expected, rate  # the same per class at every rate
        assert counts.sum() == num_samples and max(expected) - min(expected) <= 1
    assert set(labels.tolist()) == {c for c, k in zip(order, expected) if k}  # nothing drawn for nothing kept


def test_draws_are_reproducible_and_batches_independent():
    plan = _plan(num_samples=16)
    everything = plan.labels(0, plan.candidates)
    # Any batch's labels are those of its slice, whoever asks and in whatever order.
    assert np.array_equal(np.concatenate([plan.labels(f, 64) for f in (0, 64)] + [plan.labels(128, 32)]), everything)
    assert np.array_equal(_plan(num_samples=16).labels(0, plan.candidates), everything)
    # The first m candidates of a class are the first m it got: the pools grow as the rate falls.
    pools = [set(plan.pool(rate).tolist()) for rate in plan.rates]
    assert all(a <= b for a, b in zip(pools, pools[1:]))


def test_unlabelled_data_keeps_num_samples_without_rejection():
    plan = _plan(_dataset([]), num_samples=5, overrides={"num_classes": 0})
    assert plan.classes == () and plan.rates == (1.0,) and plan.candidates == 5
    assert plan.labels(0, 5).tolist() == [-1] * 5 and plan.kept(np.full(5, np.nan), plan.labels(0, 5), 1.0).tolist() \
        == [0, 1, 2, 3, 4]


# --- chosen classes ------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [["Sneaker"], "Sneaker", [SNEAKER], SNEAKER, ["sneaker"], [str(SNEAKER)]])
def test_a_class_is_named_by_name_or_index(classes):
    plan = _plan(num_samples=16, classes=classes)
    assert plan.classes == (SNEAKER,) and plan.keep.tolist() == [16]
    labels, _, kept = _selections(plan)
    assert set(labels.tolist()) == {SNEAKER} and plan.candidates == 160
    assert all(len(indices) == 16 for indices in kept.values())


def test_the_classes_keep_the_order_given():
    assert _plan(classes=["Bag", "Sneaker", 0]).classes == (8, SNEAKER, 0)
    assert resolve_classes(None, FASHION_CLASSES, 10) == tuple(range(10))
    assert resolve_classes(None, [], 0) == ()


LISTED = "the dataset's classes are 0 'T-shirt/top', 1 'Trouser'"


@pytest.mark.parametrize("classes, problem", [
    (["Giraffe"], "sample.classes: 'Giraffe' is no class of the dataset; " + LISTED),
    ([10], "sample.classes: 10 is no class index of the dataset (0 to 9); " + LISTED),
    (["12"], "sample.classes: '12' is no class index of the dataset (0 to 9); " + LISTED),
    (["Sneaker", SNEAKER], f"sample.classes: 'Sneaker' and {SNEAKER} are both class {SNEAKER} 'Sneaker': name each "
                           "class once; " + LISTED),
])
def test_a_class_the_dataset_lacks_is_a_clear_error(classes, problem):
    with pytest.raises(ValueError) as error:
        _plan(classes=classes)
    assert str(error.value).startswith(problem) and "9 'Ankle boot'" in str(error.value)


def test_a_flow_can_check_the_classes_once_the_dataset_is_known():
    check_classes(pipeline_config("smoke", sample={"classes": ["Sneaker", "Bag"]}), _dataset())
    with pytest.raises(ValueError, match=r"^sample.classes: 'Giraffe' is no class of the dataset; " + LISTED):
        check_classes(pipeline_config("smoke", sample={"classes": ["Giraffe"]}), _dataset())


def test_classes_of_unlabelled_data_or_unconditional_priors_are_errors():
    with pytest.raises(ValueError, match=r"^sample.classes=\['Sneaker'\], but the dataset has no class labels"):
        _plan(_dataset([]), classes=["Sneaker"], overrides={"num_classes": 0})
    with pytest.raises(ValueError, match=r"^sample.classes=\[7\], but the priors are unconditional \(num_classes=0\)"
                                         r".*7 'Sneaker'"):
        _plan(classes=[7], overrides={"num_classes": 0})


@pytest.mark.parametrize("classes, problem", [
    ([], "sample.classes is empty"),
    ([-1], "sample.classes: [-1] are not classes"),
    (["Bag", "Bag", 3, 3], "sample.classes names ['Bag', 3] more than once: name each class once"),
])
def test_what_needs_no_dataset_fails_with_the_config(classes, problem):
    with pytest.raises(ValidationError) as error:
        pipeline_config("smoke", sample={"classes": classes})
    assert problem in str(error.value)


def test_the_classes_are_part_of_the_sample_key_and_none_stays_valid():
    plain = stage_keys(pipeline_config("smoke"), "sha256:" + "0" * 64)
    chosen = stage_keys(pipeline_config("smoke", sample={"classes": ["Sneaker"]}), "sha256:" + "0" * 64)
    assert {stage for stage in plain if plain[stage] != chosen[stage]} == {"sample", "evaluate"}
    assert SampleSettings.of(pipeline_config("smoke")).classes is None
    assert "dataset" in BY_NAME["sample"].inputs  # the class names a name is resolved against


# --- the stage, on the smoke run's models --------------------------------------------------------

slow = pytest.mark.slow


def _kept_labels(samples) -> dict[float, np.ndarray]:
    labels = load_samples(samples.batches)["labels"]
    selections = load_npz(samples.selections)
    return {row.rate: labels[selections[rate_key(row.rate)]] for row in samples.rates}


def test_top_p_reaches_the_draw_and_the_samples_key_only_when_set():
    base = SampleSettings.of(pipeline_config("smoke"))
    nucleus = SampleSettings.of(pipeline_config("smoke", sample={"top_p": 0.9}))
    assert base.options().top_p is None and nucleus.options().top_p == 0.9
    assert nucleus.options().described() == "temperature 1, top-k off, top-p 0.9"
    keys = [SAMPLE.key(settings, {name: "k" for name in SAMPLE.inputs}) for settings in (base, nucleus)]
    assert keys[0] != keys[1]
    before = base.model_dump(mode="json")
    del before["top_p"]  # the samples' settings as they were before top_p existed
    assert artifact_key(SAMPLE.directory, before, {name: "k" for name in SAMPLE.inputs}, SAMPLE.code_version) == keys[0]
    with pytest.raises(ValidationError, match="top_p"):
        pipeline_config("smoke", sample={"top_p": 1.5})


@slow
def test_the_pipeline_keeps_sixteen_over_ten_classes_at_every_rate(smoke_run):
    config, _, _ = smoke_run
    samples = FinishedRun(config).get(SAMPLE)
    assert samples.num_samples == 16 and samples.classes == list(range(10)) and samples.candidates == 160
    kept = _kept_labels(samples)
    assert sorted(kept) == [0.1, 0.25, 0.5, 1.0]
    for rate, labels in kept.items():
        assert np.bincount(labels, minlength=10).tolist() == [2, 2, 2, 2, 2, 2, 1, 1, 1, 1], rate
        assert labels[:10].tolist() == list(range(10))  # grid.png's first row covers the classes


@slow
def test_the_sample_flow_draws_sixteen_sneakers(smoke_run):
    from flows.pipeline import sample_flow

    _, root, _ = smoke_run
    config = smoke_config(str(root), sample={"num_samples": 16, "classes": ["Sneaker"]})
    state = sample_flow(**sections_of(config), return_state=True)
    assert state.is_completed(), state.message
    samples = state.result()
    assert samples.num_samples == 16 and samples.classes == [SNEAKER] and samples.candidates == 160
    assert load_samples(samples.batches)["labels"].tolist() == [SNEAKER] * 160  # intended labels: all sneakers
    assert all(row.kept == 16 for row in samples.rates)
    assert all(labels.tolist() == [SNEAKER] * 16 for labels in _kept_labels(samples).values())
    assert samples.rejection_grid is not None and samples.judge_mean_confidence is not None
    assert FinishedRun(config).get(SAMPLE).key == samples.key != FinishedRun(smoke_config(str(root))).get(SAMPLE).key
    # The card names the class as the user did, its index beside it.
    (card,) = [a for a in artifacts(state.state_details.flow_run_id) if a.key and a.key.startswith("vqvae2-samples")]
    assert card.description.startswith(f"16 samples (classes Sneaker ({SNEAKER}); "), card.description


@slow
def test_the_sample_flow_refuses_an_unknown_class_before_drawing(smoke_run):
    from flows.pipeline import sample_flow

    _, root, _ = smoke_run
    before = sorted(p.name for p in (root / "samples").iterdir())
    config = smoke_config(str(root), sample={"classes": ["Giraffe"]})
    state = sample_flow(**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"^sample.classes: 'Giraffe' is no class of the dataset; " + LISTED):
        state.result()
    assert sorted(p.name for p in (root / "samples").iterdir()) == before  # nothing drawn


@pytest.mark.slow
def test_the_pipeline_refuses_an_unknown_class_before_any_training(prefect_api, tmp_path):
    from flows.pipeline import vqvae2_pipeline

    root = tmp_path / "root"
    state = vqvae2_pipeline(**sections_of(smoke_config(str(root), sample={"classes": ["Giraffe"]})),
                            return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"^sample.classes: 'Giraffe' is no class of the dataset; " + LISTED):
        state.result()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["datasets"]  # no training began
