"""Sample-quality metrics through torch-fidelity, offline: the domain extractor (a real
classifier trained here on real Fashion-MNIST); Inception from a local file here, fetched in
test_inception.py."""
import logging
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import vqvae2
from inception_weights import WEIGHTS_NAME, loopback_only, random_inception_weights
from storage.fsutil import write_bytes
from tasks.fidelity import (
    PER_CLASS_MIN,
    DOMAIN_EXTRACTOR,
    INCEPTION_WEIGHTS_FIELD,
    FidelityImages,
    InceptionWeightsMissing,
    DomainFeatureExtractor,
    fidelity_metrics,
    fidelity_table,
    inception_cache_path,
    isc_splits_for,
    kid_subset_size_for,
    per_class_fid,
    register_domain_extractor,
    resolve_extractor,
)
from tasks.inception import inception_url

TRAIN_IMAGES = 4000  # the classifier learns from these; the metrics use the images after them


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME (no cached Inception weights) and no network but 127.0.0.1 (where
    the tests' URL of the weights answers nothing: conftest.py)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    loopback_only(monkeypatch)
    return tmp_path / "torch-home"


@pytest.fixture(scope="module")
def images16(fashion_mnist_test_split) -> torch.Tensor:
    """Real Fashion-MNIST test images resized to the smoke preset's 16x16, floats in [0, 1]."""
    images, _ = fashion_mnist_test_split
    return F.interpolate(torch.from_numpy(images[:, None]).float() / 255, size=16, mode="bilinear", antialias=True)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def features_checkpoint(images16, fashion_mnist_test_split, tmp_path_factory) -> str:
    """model.pt of a smoke-preset 'features' classifier trained for a few seconds; the
    module runs on one intra-op thread (tiny models: a second one only waits on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    labels = torch.from_numpy(fashion_mnist_test_split[1]).long()
    config = vqvae2.preset("smoke")
    vqvae2.seed_everything(1000)  # the 'features' role's seed offset, as in tasks.stages.train_classifier
    model = vqvae2.build_classifier(config)
    optimizer, scheduler = vqvae2.make_optimizer(model, config.train_classifier)
    for _ in range(config.train_classifier.steps):
        batch = torch.randint(0, TRAIN_IMAGES, (config.train_classifier.batch_size,))
        vqvae2.classifier_step(model, optimizer, images16[batch], labels[batch], amp="off", scheduler=scheduler)
    path = tmp_path_factory.mktemp("classifier") / "model.pt"
    torch.save(vqvae2.to_checkpoint(model), path)
    yield str(path)
    torch.set_num_threads(threads)


@pytest.fixture
def domain(features_checkpoint):
    return resolve_extractor("domain", domain_checkpoint=features_checkpoint)


def test_fid_of_a_set_against_itself_is_zero(images16, domain):
    real = to_uint8(images16[TRAIN_IMAGES:TRAIN_IMAGES + 400])
    metrics = fidelity_metrics(real, real, domain)
    assert abs(metrics["fid"]) < 1e-6
    assert metrics["precision"] == metrics["recall"] == 1.0


def test_a_table_of_sets_extracts_the_reference_once_and_matches_separate_calls(images16, domain, monkeypatch):
    reference = to_uint8(images16[TRAIN_IMAGES:TRAIN_IMAGES + 400])
    sets = {"a": to_uint8(images16[TRAIN_IMAGES + 400:TRAIN_IMAGES + 600]),
            "b": to_uint8(images16[TRAIN_IMAGES + 600:TRAIN_IMAGES + 700])}
    separate = {name: fidelity_metrics(images, reference, domain) for name, images in sets.items()}
    seen = []
    forward = DomainFeatureExtractor.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(DomainFeatureExtractor, "forward", counting)
    table = fidelity_table(sets, reference, domain)
    assert table == separate
    assert sum(seen) == 400 + 200 + 100  # the reference once, each set once


def test_per_class_fid_measures_each_class_against_its_own_and_marks_the_classes_too_small(
        images16, fashion_mnist_test_split, domain):
    """Real images labelled truly score low per class; labelled as another class, high; a class
    with fewer than PER_CLASS_MIN images keeps its row, counts and no FID."""
    labels = torch.from_numpy(fashion_mnist_test_split[1]).long()
    real, real_labels = to_uint8(images16[TRAIN_IMAGES:TRAIN_IMAGES + 600]), labels[TRAIN_IMAGES:TRAIN_IMAGES + 600]
    drawn = to_uint8(images16[TRAIN_IMAGES + 600:TRAIN_IMAGES + 1200])
    truly = labels[TRAIN_IMAGES + 600:TRAIN_IMAGES + 1200]
    classes = {0: "T-shirt/top", 1: "Trouser", 7: "Sneaker"}
    rows = per_class_fid(drawn, truly, real, real_labels, classes, domain)
    assert [(row["class"], row["name"]) for row in rows] == list(classes.items())
    assert [row["samples"] for row in rows] == [int((truly == c).sum()) for c in classes]
    assert [row["reference"] for row in rows] == [int((real_labels == c).sum()) for c in classes]
    swapped = torch.where(truly == 1, 7, torch.where(truly == 7, 1, truly))  # trousers drawn as sneakers
    wrong = {row["class"]: row["fid"] for row in per_class_fid(drawn, swapped, real, real_labels, classes, domain)}
    right = {row["class"]: row["fid"] for row in rows}
    assert wrong[1] > 5 * right[1] and wrong[7] > 5 * right[7] and wrong[0] == pytest.approx(right[0])
    few = truly.clone()
    few[(truly == 0).nonzero()[PER_CLASS_MIN - 1:]] = 99  # class 0 keeps PER_CLASS_MIN - 1 samples
    (tiny, *_) = per_class_fid(drawn, few, real, real_labels, {0: "T-shirt/top"}, domain)
    assert tiny == {"class": 0, "name": "T-shirt/top", "samples": PER_CLASS_MIN - 1,
                    "reference": int((real_labels == 0).sum()), "fid": None}


def test_fid_rises_monotonically_with_gaussian_noise_and_metrics_stay_in_range(images16, domain):
    reference = to_uint8(images16[TRAIN_IMAGES:TRAIN_IMAGES + 400])
    clean = images16[TRAIN_IMAGES + 400:TRAIN_IMAGES + 800]  # other real images: FID small, not zero
    generator = torch.Generator().manual_seed(0)
    results = []
    for sigma in (0.0, 0.1, 0.2, 0.4):
        noisy = to_uint8(clean + sigma * torch.randn(clean.shape, generator=generator))
        results.append(fidelity_metrics(noisy, reference, domain))
    fids = [m["fid"] for m in results]
    assert fids == sorted(fids) and fids[0] < fids[-1] / 10, fids
    for m in results:
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        assert all(map(torch.isfinite, torch.tensor([m["kid_mean"], m["kid_std"], m["fid"]])))
        # IS from the domain classifier: between 1 and the number of classes.
        assert 1.0 <= m["isc_mean"] <= 10.0 and m["isc_splits"] == 4
        assert m["kid_subset_size"] == 400 and m["num_generated"] == m["num_reference"] == 400
    assert results[-1]["kid_mean"] > results[0]["kid_mean"]
    assert results[-1]["precision"] < results[0]["precision"]


def test_domain_extractor_registers_once_and_runs_offline_from_a_non_local_url(
        images16, features_checkpoint, offline):
    threads = [threading.Thread(target=register_domain_extractor) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert register_domain_extractor() == DOMAIN_EXTRACTOR and DOMAIN_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY
    url = "memory://fidelity-test/classifiers/features/model.pt"  # an object store, as S3 is: copied to a temp file
    with open(features_checkpoint, "rb") as f:
        write_bytes(url, f.read())
    extractor = resolve_extractor("domain", domain_checkpoint=url)
    images = to_uint8(images16[TRAIN_IMAGES:TRAIN_IMAGES + 60])
    metrics = fidelity_metrics(images[:30], images[30:], extractor, isc=False, device="cpu")
    assert {"fid", "kid_mean", "kid_std", "precision", "recall"} <= metrics.keys() and "isc_mean" not in metrics
    assert metrics["kid_subset_size"] == 30
    assert not offline.exists()  # nothing downloaded, nothing cached under TORCH_HOME
    assert extractor.report()["extractor"] == DOMAIN_EXTRACTOR and "storage_options" not in extractor.report()


def test_inception_without_weights_says_where_to_put_them(offline):
    expected = os.path.join(str(offline), "hub", "checkpoints", WEIGHTS_NAME)
    assert inception_cache_path() == expected
    with pytest.raises(InceptionWeightsMissing) as error:
        resolve_extractor("inception")
    message = str(error.value)
    assert expected in message and INCEPTION_WEIGHTS_FIELD in message and inception_url() in message
    with pytest.raises(InceptionWeightsMissing, match=f"{INCEPTION_WEIGHTS_FIELD} is '/nowhere/inception.pth'"):
        resolve_extractor("auto", inception_weights="/nowhere/inception.pth", domain_checkpoint="unused")


def test_auto_without_inception_weights_picks_domain_and_says_so(features_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="vqvae2"):
        extractor = resolve_extractor("auto", domain_checkpoint=features_checkpoint)
    assert (extractor.requested, extractor.kind, extractor.name) == ("auto", "domain", DOMAIN_EXTRACTOR)
    assert "features=auto: using the domain extractor" in caplog.text and "no Inception weights" in caplog.text
    assert "no Inception weights" in extractor.description and "not comparable" in extractor.description.lower()
    assert extractor.feature_layers == {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}
    assert extractor.report()["features"] == "auto"


def test_auto_takes_inception_only_where_the_config_names_its_weights(features_checkpoint):
    path = inception_cache_path()
    os.makedirs(os.path.dirname(path))
    random_inception_weights(path)  # torch-fidelity's own module's names and shapes, random values
    # Weights in this machine's cache do not change what `auto` measures with: one config, one feature space.
    assert resolve_extractor("auto", domain_checkpoint=features_checkpoint).kind == "domain"
    extractor = resolve_extractor("auto", inception_weights=path, domain_checkpoint=features_checkpoint)
    assert (extractor.kind, extractor.name, extractor.weights) == ("inception", "inception-v3-compat", path)
    assert extractor.feature_layers["fid"] == "2048" and extractor.feature_layers["isc"] == "logits_unbiased"
    assert resolve_extractor("inception").kind == "inception"  # asked for by name, the cache's file is used
    with open(path, "wb") as f:
        f.write(b"<html>rate limited</html>")
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        resolve_extractor("inception")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)  # loadable, but not the whole network
    with pytest.raises(ValueError, match=r"not torch-fidelity's Inception-v3 weights \(\d+ tensors missing"):
        resolve_extractor("inception")


def test_domain_needs_the_features_classifier(tmp_path):
    with pytest.raises(ValueError, match="'features' classifier"):
        resolve_extractor("domain")
    with pytest.raises(FileNotFoundError, match="train it first"):
        resolve_extractor("domain", domain_checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_extractor("clip")


def test_images_are_uint8_with_gray_repeated_and_small_sets_are_sized_sensibly(domain):
    gray = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8)
    item = FidelityImages(gray)[2]
    assert item.shape == (3, 16, 16) and item.dtype == torch.uint8 and all(torch.equal(c, gray[2]) for c in item)
    assert FidelityImages(torch.zeros(2, 3, 8, 8, dtype=torch.uint8).numpy())[0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"uint8.*\* 255"):
        FidelityImages(torch.rand(2, 1, 8, 8))
    assert kid_subset_size_for(5000, 300) == 300 and kid_subset_size_for(5000, 4000) == 1000
    with pytest.raises(ValueError, match=r"kid_subset_size must be in \[2, 300\]"):
        kid_subset_size_for(5000, 300, 500)
    assert isc_splits_for(50) == 1 and isc_splits_for(450) == 4 and isc_splits_for(50_000) == 10
    with pytest.raises(ValueError, match="at least 4 images"):
        fidelity_metrics(gray[:3], gray, domain)
