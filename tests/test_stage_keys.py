"""Cache-key completeness: change any field of the pipeline config or of the model preset,
and exactly the stages that read it, and every stage downstream of them, get a new key.

The fields are walked, not listed: a field added to a config section or to a model
config is covered the day it is added. What each stage reads is the table `READERS`
below, written from what the stages do, not from their declarations.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tasks.config import PipelineConfig, pipeline_config

SOURCE_DIGEST = "sha256:" + "0" * 64

# Which stage keys are computed from which (a stage's key digests its inputs' keys).
UPSTREAM: dict[str, set[str]] = {
    "ingest": set(),
    "train-autoencoder": {"ingest"},
    "encode": {"ingest", "train-autoencoder"},
    "train-priors[0]": {"encode"},
    "train-priors[1]": {"encode"},
    "train-classifiers[judge]": {"ingest"},
    "train-classifiers[features]": {"ingest"},
    "sample": {"train-autoencoder", "train-priors[0]", "train-priors[1]", "train-classifiers[judge]"},
    "evaluate": {"ingest", "train-autoencoder", "encode", "train-priors[0]", "train-priors[1]",
                 "train-classifiers[judge]", "train-classifiers[features]", "sample"},
}
EVERY_STAGE = set(UPSTREAM)
CLASSIFIERS = {"train-classifiers[judge]", "train-classifiers[features]"}
PRIORS = {"train-priors[0]", "train-priors[1]"}

# Field (a dotted path, or the path of a section or model config above it) -> the stages
# whose output depends on it. The longest matching path wins. An empty set: the field
# changes how the work runs (where, how fast, how often it checkpoints), never its result.
READERS: dict[str, set[str]] = {
    "preset": EVERY_STAGE,
    "source": set(),  # the source reaches the keys only through its content digest (below)
    "storage": set(),  # keys are relative to the root: a moved root keeps its artifacts
    "ingest": {"ingest"},
    "training": set(),
    "training.num_workers": {"train-autoencoder"} | CLASSIFIERS,  # shard readers interleave: batch order
    "training.processes": {"train-autoencoder"} | CLASSIFIERS | PRIORS,  # data-parallel ranks split the data
    "training.nnodes": {"train-autoencoder"} | CLASSIFIERS | PRIORS,  # processes on each node
    "encode": set(),  # per image, deterministic: the batch size is throughput only
    "sample": {"sample"},
    "evaluate": {"evaluate"},
    "evaluate.grid_size": {"sample", "evaluate"},  # the samples' grid.png and the report's grids
    "evaluate.features": {"evaluate", "train-classifiers[features]"},  # whether a features classifier is trained
    # Under features auto, naming Inception's file means no features classifier: the config
    # decides it, never which files a machine holds.
    "evaluate.inception_weights": {"evaluate", "train-classifiers[features]"},
    "runner": set(),
    # The model preset, field by field (set through `overrides`).
    "model.name": {"evaluate"},  # the report records the model config it describes
    "model.image_size": {"ingest", "train-autoencoder"} | CLASSIFIERS,
    "model.image_channels": {"ingest", "train-autoencoder"} | CLASSIFIERS,
    "model.num_classes": CLASSIFIERS | PRIORS | {"sample"},
    "model.autoencoder": {"train-autoencoder"},
    "model.train_autoencoder": {"train-autoencoder"},
    "model.priors.0": {"train-priors[0]"},
    "model.priors.1": {"train-priors[1]"},
    "model.train_prior": PRIORS,
    "model.classifier": CLASSIFIERS,
    "model.train_classifier": CLASSIFIERS,
}


def stage_keys(config: PipelineConfig, source_digest: str = SOURCE_DIGEST) -> dict[str, str]:
    from tasks.stages import stage_keys as declared_keys

    return declared_keys(config, source_digest)


# --- walking the fields ----------------------------------------------------------------------


def _leaves(value: Any, path: str):
    """(dotted path, value, annotation) of every leaf field below `value`."""
    if isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            yield from _leaves_of(getattr(value, name), f"{path}.{name}".lstrip("."), info.annotation)
    elif dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            yield from _leaves_of(getattr(value, f.name), f"{path}.{f.name}".lstrip("."), hints[f.name])


def _leaves_of(value: Any, path: str, annotation: Any):
    if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
        yield from _leaves(value, path)
    elif isinstance(value, tuple) and value and (dataclasses.is_dataclass(value[0])):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}.{i}")
    else:
        yield path, value, annotation


def _candidates(value: Any, annotation: Any) -> list[Any]:
    """Other values for a field, most plausible first; the first valid one is used."""
    choices = [a for a in typing.get_args(annotation) if isinstance(a, str)]
    if typing.get_origin(annotation) is typing.Literal or choices:
        return [c for c in choices if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2, value + 2, value + 1, value - 1]
    if isinstance(value, float):
        return [value * 0.5, value * 2, value + 0.1, 0.5]
    if isinstance(value, str):
        return {"auto": ["bf16", "off", "none"], "constant": ["cosine"], "level": ["above"], "above": ["level"]}.get(value, []) + [value + "-changed", "changed-" + value]
    if isinstance(value, tuple):
        return [(first, *value[1:]) for first in _candidates(value[0], type(value[0]))]
    if isinstance(value, list):
        return [[*value, 0.2], [*value, "extra"]]
    if isinstance(value, dict):
        return [{**value, "autoencoder": 5}, {**value, "anon": True}]
    if value is None:
        return [100, 5, "/nonexistent/changed", ["a", "b"], "tcp://127.0.0.1:8786", 0.5]
    raise AssertionError(f"no candidate values for a {type(value).__name__}")


def _with_pipeline_field(config: PipelineConfig, path: str, value: Any) -> PipelineConfig:
    data = config.model_dump()
    *parents, name = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[name] = value
    return PipelineConfig.model_validate(data)


def _with_model_field(config: PipelineConfig, path: str, value: Any) -> PipelineConfig:
    field = path.removeprefix("model.")
    return PipelineConfig.model_validate({**config.model_dump(), "overrides": {**config.overrides, field: value}})


def _changed(config: PipelineConfig, path: str, value: Any, annotation: Any, setter) -> tuple[Any, PipelineConfig]:
    for candidate in _candidates(value, annotation):
        if candidate == value:
            continue
        try:
            changed = setter(config, path, candidate)
        except (ValidationError, ValueError, TypeError):
            continue
        if changed != config:
            return candidate, changed
    raise AssertionError(f"{path}: found no valid other value for {value!r}; teach _candidates one")


def _expected(path: str) -> set[str]:
    readers = next(READERS[p] for p in sorted(READERS, key=len, reverse=True) if path == p or path.startswith(p + "."))
    closure = set(readers)
    while True:
        grown = closure | {stage for stage, above in UPSTREAM.items() if above & closure}
        if grown == closure:
            return closure
        closure = grown


def _base() -> PipelineConfig:
    # A list source, whose URL lets the walk change the source's kind too (other kinds need one), and
    # which takes every source field. A rendezvous endpoint, so that the walk can change the number of nodes too.
    return pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"},
                           source={"kind": "list", "url": "/data/images.csv"},
                           training={"rdzv_endpoint": "node0:29500"})


def _fields() -> list[tuple[str, Any, Any, Any]]:
    base = _base()
    pipeline = [(path, v, a, _with_pipeline_field) for path, v, a in _leaves(base, "") if path != "overrides"]
    model = [(f"model.{path}", v, a, _with_model_field) for path, v, a in _leaves(base.model, "")]
    return pipeline + model


FIELDS = _fields()


def test_the_walk_covers_every_section_and_the_model():
    paths = {path for path, *_ in FIELDS}
    assert {"preset", "ingest.shard_size", "training.num_workers", "evaluate.grid_size", "sample.seed",
            "model.autoencoder.codebook_size", "model.priors.1.cond_res_blocks", "model.train_classifier.lr"} <= paths
    assert len(paths) > 80


@pytest.mark.parametrize("path, value, annotation, setter", FIELDS, ids=[f[0] for f in FIELDS])
def test_changing_a_field_changes_exactly_the_keys_of_the_stages_that_read_it(path, value, annotation, setter):
    base = _base()
    new_value, changed = _changed(base, path, value, annotation, setter)
    before, after = stage_keys(base), stage_keys(changed)
    moved = {stage for stage in before.keys() | after.keys() if before.get(stage) != after.get(stage)}
    assert moved == _expected(path), f"{path}: {value!r} -> {new_value!r}"


def test_a_changed_source_changes_the_dataset_and_everything_downstream():
    config = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"})
    before, after = stage_keys(config), stage_keys(config, "sha256:" + "1" * 64)
    assert {stage for stage in before if before[stage] != after[stage]} == EVERY_STAGE


def test_the_same_config_gives_the_same_keys():
    first = stage_keys(pipeline_config("smoke", storage={"root": "/tmp/a"}))
    assert first == stage_keys(pipeline_config("smoke", storage={"root": "/tmp/a"}))
    assert len(set(first.values())) == len(first)


# --- the classes follow the data by default, and Fashion-MNIST's keys stay as they were --------

# The keys and run-lease names of the default configs, computed before `num_classes` followed the
# data by default (with the same root and source digest as here): a default run on Fashion-MNIST
# must find the artifacts and the lease of a run made before. The evaluate keys moved on purpose
# once since: its code version 4 adds the per-class FID to the report (a report is remade,
# nothing is retrained). fashion-mnist's keys moved on purpose three times since (issue 35): its
# priors train as benchmarks/bench_quality.py measured best, then its bottom prior as
# benchmarks/bench_prior_alone.py did, then every training in bf16 autocast; its dataset and its
# run lease stay.
KEYS_BEFORE_AUTO_CLASSES = {
    "fashion-mnist": ({
        "ingest": "c76da303a4e2dec6", "train-classifiers[judge]": "34ef19ac859b3702",
        "train-classifiers[features]": "82992802610504a3", "train-autoencoder": "46596cc0ddbe3580",
        "encode": "ddecb78516481025", "train-priors[0]": "c0769123274e8dc5", "train-priors[1]": "adf400c1785d952f",
        "sample": "edc0bf17a4ee6ee7", "evaluate": "33313d6df0cccf19",
    }, "vqvae2-run-bb5d015a073bdaf0"),
    # Derived from fashion-mnist's since (vqvae2.presets): the same keys as when written out by hand.
    "fashion-mnist-gpu": ({
        "ingest": "c76da303a4e2dec6", "train-classifiers[judge]": "9b22cf13a0c208ff",
        "train-classifiers[features]": "1128a05a3c6356d1", "train-autoencoder": "d0278d74d9894ef8",
        "encode": "bdcd8abf1cfd08c0", "train-priors[0]": "0c0b86f19fabed1e", "train-priors[1]": "a22a23c2763a0d1a",
        "sample": "bcf74f585a5a6f2a", "evaluate": "ba92102c3112bf67",
    }, "vqvae2-run-b0c025e25eaa6454"),
    "smoke": ({
        "ingest": "d6537bad74137705", "train-classifiers[judge]": "9afbb3f950276150",
        "train-classifiers[features]": "1394d397718e5332", "train-autoencoder": "5a314ff518d59784",
        "encode": "63602dca7a819777", "train-priors[0]": "6731cc15c1db9a2d", "train-priors[1]": "d52073e42f4236d9",
        "sample": "448c2f8e868bce8e", "evaluate": "cd6a18e537495d19",
    }, "vqvae2-run-39d6aa0f24ad307f"),
}


def _dataset(class_names: list[str]):
    from tasks.stages.ingest import DatasetManifest

    return DatasetManifest.model_construct(class_names=class_names, source={"kind": "image_folder"})


@pytest.mark.parametrize("preset", sorted(KEYS_BEFORE_AUTO_CLASSES))
def test_a_default_config_on_fashion_mnist_keeps_its_keys_and_its_config_key(preset):
    from tasks.config import config_key
    from tasks.stages.ingest import with_dataset_classes

    keys, lease = KEYS_BEFORE_AUTO_CLASSES[preset]
    config = pipeline_config(preset, storage={"root": "/tmp/vqvae2-keys"})
    assert "num_classes" not in config.overrides and not config.classes_from_data and not config.classes_fixed
    assert stage_keys(config) == keys and "vqvae2-run-" + config_key(config) == lease  # as the run lease named it
    fashion_mnist = _dataset([str(i) for i in range(10)])  # the preset's 10 classes: the config stays itself
    assert with_dataset_classes(config, fashion_mnist) is config


@pytest.mark.parametrize("names, taken", [(["cat", "dog", "emu"], 3), ([], 0), (["only"], 0)])
def test_a_default_config_takes_other_classes_from_the_data_with_the_keys_of_that_number_set_by_hand(names, taken):
    from tasks.stages.ingest import with_dataset_classes

    config = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"})
    adopted = with_dataset_classes(config, _dataset(names))
    assert adopted.model.num_classes == taken
    by_hand = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"}, overrides={"num_classes": taken})
    assert stage_keys(adopted) == stage_keys(by_hand)


@pytest.mark.parametrize("fixed, names", [(10, ["cat", "dog", "emu"]), (10, []), (3, [str(i) for i in range(10)])])
def test_a_number_of_classes_set_by_hand_is_checked_against_the_data(fixed, names):
    from tasks.stages.ingest import with_dataset_classes

    config = pipeline_config("smoke", overrides={"num_classes": fixed})
    with pytest.raises(ValueError, match=rf"but the model has num_classes={fixed} "):
        with_dataset_classes(config, _dataset(names))
    unconditional = pipeline_config("smoke", overrides={"num_classes": 0})  # 0 forces unconditional priors
    assert with_dataset_classes(unconditional, _dataset(names)) is unconditional
