"""Ingestion: sources -> WebDataset shards + manifest, on local disk, memory:// and S3 (moto)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from storage.fsutil import exists, find, read_json
from storage.imaging import fit
from storage.ingest import (
    IngestConfig,
    TooManyBadImages,
    finalize_dataset,
    ingest,
    plan_ingest,
    shard_counts,
    write_shard,
    write_shards,
)
from storage.loader import iter_shard_batches
from storage.shards import iter_samples
from storage.sources import IdxSource, ImageFolderSource, TarSource

SUBSET = 600  # Fashion-MNIST images per split in these tests


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_fashion_mnist_round_trip_reads_back_the_pixels_and_labels(storage_root, fashion_mnist_test_split):
    root, options = storage_root
    url = f"{root}/datasets/fm"
    config = IngestConfig(image_size=32, mode="L", shard_size=250, max_samples_per_split=SUBSET)
    manifest = ingest(IdxSource(), url, config, storage_options=options)

    test = manifest["splits"]["test"]
    assert test["num_samples"] == SUBSET and manifest["num_skipped"] == 0
    assert [s["num_samples"] for s in test["shards"]] == [250, 250, 100]
    assert [s["offset"] for s in test["shards"]] == [0, 250, 500]
    assert sum(test["class_counts"]) == SUBSET
    assert manifest["class_names"][9] == "Ankle boot" and manifest["channels"] == 1

    images, labels = fashion_mnist_test_split
    expected = np.stack([np.asarray(fit(Image.fromarray(a), 32, "L")) for a in images[:SUBSET]])
    got_images, got_labels, got_keys = [], [], []
    for index in range(3):
        for batch, batch_labels, keys in iter_shard_batches(url, "test", index, 64, storage_options=options):
            got_images.append((batch * 255).round().to(torch.uint8)[:, 0].numpy())
            got_labels.append(batch_labels.numpy())
            got_keys += keys
    np.testing.assert_array_equal(np.concatenate(got_images), expected)
    np.testing.assert_array_equal(np.concatenate(got_labels), labels[:SUBSET])
    assert got_keys[250] == "test-000001-000000" and all("." not in k for k in got_keys)


def test_sample_json_names_source_and_original_size(tmp_path):
    url = str(tmp_path / "ds")
    ingest(IdxSource(), url, IngestConfig(shard_size=50, max_samples_per_split=50))
    sample = next(iter_samples(f"{url}/train/shard-000000.tar"))
    assert sorted(k for k in sample if not k.startswith("__")) == ["cls", "json", "png"]
    meta = json.loads(sample["json"])
    assert meta == {"source": "train-images-idx3-ubyte.gz#0", "original_size": [28, 28]}
    assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 0),
        ("mode", "CMYK"),
        ("shard_size", 2.5),
        ("max_bad_fraction", 1.5),
        ("holdout_fraction", -0.1),
        ("max_samples_per_split", 0),
    ],
)
def test_wrong_config_fails_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"IngestConfig\.{field} must be"):
        IngestConfig(**{field: value})


@pytest.fixture
def folder_with_bad_files(tmp_path):
    """Three classes of 8 small RGB images, plus a corrupt PNG and a zero-byte file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls in ("cat", "dog", "owl"):
        for i in range(8):
            _write_png(root / cls / f"{i:02d}.png", rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    good = (root / "cat" / "00.png").read_bytes()
    (root / "dog" / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "owl" / "empty.png").write_bytes(b"")
    (root / ".DS_Store").write_bytes(b"ignored")
    (root / "README.txt").write_text("not in a class folder")
    return root


def test_image_folder_skips_and_names_corrupt_and_empty_files(folder_with_bad_files, tmp_path):
    url = str(tmp_path / "ds")
    config = IngestConfig(image_size=16, mode="RGB", shard_size=5, max_bad_fraction=0.1, holdout_fraction=0.25)
    manifest = ingest(ImageFolderSource(str(folder_with_bad_files)), url, config)

    skipped = {s["ref"]: s["reason"] for split in manifest["splits"].values() for s in split["skipped"]}
    assert set(skipped) == {"dog/corrupt.png", "owl/empty.png"}
    assert skipped["owl/empty.png"] == "empty file"
    assert "cannot decode" in skipped["dog/corrupt.png"]
    assert manifest["num_samples"] == 24 and manifest["num_skipped"] == 2
    assert manifest["ignored"] == [{"ref": "README.txt", "reason": "not inside a class folder"}]
    assert manifest["class_names"] == ["cat", "dog", "owl"]
    assert {"train", "test"} <= set(manifest["splits"]) and manifest["splits"]["test"]["num_samples"] > 0
    images, _, _ = next(iter_shard_batches(url, "train", 0, 5))
    assert images.shape == (5, 3, 16, 16)


def test_image_folder_on_s3_ingests_to_memory(folder_with_bad_files, s3_bucket, tmp_path):
    from storage.fsutil import filesystem

    fs, path = filesystem(f"{s3_bucket.url}/images", s3_bucket.storage_options)
    fs.put(str(folder_with_bad_files) + "/", path, recursive=True)
    source = ImageFolderSource(f"{s3_bucket.url}/images", storage_options=s3_bucket.storage_options)
    config = IngestConfig(image_size=16, mode="RGB", shard_size=7, max_bad_fraction=0.1)
    manifest = ingest(source, f"memory://{tmp_path.name}/ds", config)
    assert manifest["num_samples"] == 24
    assert sorted(s["ref"] for split in manifest["splits"].values() for s in split["skipped"]) == ["dog/corrupt.png", "owl/empty.png"]
    assert manifest["source"] == {"kind": "image_folder", "url": f"{s3_bucket.url}/images", "labels": "auto"}


def test_too_many_bad_images_fail_clearly_and_leave_no_manifest(folder_with_bad_files, tmp_path):
    url = str(tmp_path / "ds")
    config = IngestConfig(image_size=16, shard_size=5, max_bad_fraction=0.05)
    with pytest.raises(TooManyBadImages, match=r"2 of 26 images.*max_bad_fraction=0.05.*(corrupt|empty)\.png"):
        ingest(ImageFolderSource(str(folder_with_bad_files)), url, config)
    assert not exists(f"{url}/manifest.json")
    # nor the shards: refused, this dataset would be refused again; nothing looks like an ingest to resume
    assert not exists(url)


def test_a_refused_dataset_leaves_nothing_on_s3_either(folder_with_bad_files, s3_bucket):
    url = f"{s3_bucket.url}/datasets/ds"
    config = IngestConfig(image_size=16, shard_size=5, max_bad_fraction=0.05)
    with pytest.raises(TooManyBadImages):
        ingest(ImageFolderSource(str(folder_with_bad_files)), url, config, storage_options=s3_bucket.storage_options)
    assert find(s3_bucket.url, s3_bucket.storage_options) == {}


def test_presplit_folder_keeps_its_splits(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                _write_png(tmp_path / "src" / split / cls / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    manifest = ingest(ImageFolderSource(str(tmp_path / "src")), str(tmp_path / "ds"), IngestConfig(image_size=8))
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 12, "test": 6}
    assert manifest["splits"]["test"]["class_counts"] == [3, 3]


class _FailingSource:
    """Wraps a source so that reading its second shard breaks half way (a crash mid-write)."""

    def __init__(self, inner):
        self.inner = inner
        self.kind = inner.kind

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open(self):
        inner = self.inner.open()

        class Reader:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                inner.close()

            def read(self, split, unit):
                for n, item in enumerate(inner.read(split, unit)):
                    if unit[0] > 0 and n == 10:
                        raise RuntimeError("simulated crash")
                    yield item

        return Reader()


def test_a_crash_mid_shard_leaves_nothing_visible_and_a_rerun_resumes(tmp_path):
    url = str(tmp_path / "ds")
    config = IngestConfig(shard_size=40, max_samples_per_split=80)
    plan = plan_ingest(_FailingSource(IdxSource()), config, digest="test")
    train = [t for t in plan.tasks if t.split == "train"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(train, url)
    assert sorted(find(f"{url}/train")) == ["shard-000000.json", "shard-000000.tar"]  # no temp, no half shard

    good = plan_ingest(IdxSource(), config, digest="test")
    results = [write_shard(t, url) for t in good.tasks]
    assert [r.reused for r in results if r.split == "train"] == [True, False]
    manifest = finalize_dataset(good, results, url)
    assert manifest["splits"]["train"]["num_samples"] == 80
    assert read_json(f"{url}/manifest.json") == manifest


@pytest.mark.parametrize("damage", ["truncated", "bytes changed in place"])
def test_a_shard_damaged_after_ingest_is_made_again_not_reused(tmp_path, damage):
    from storage.loader import ShardDataset

    url, config = str(tmp_path / "ds"), IngestConfig(shard_size=40, max_samples_per_split=80)
    first = ingest(IdxSource(), url, config)
    shard = tmp_path / "ds" / "train" / "shard-000001.tar"
    intact = shard.read_bytes()
    if damage == "truncated":  # its record and task digest still match
        shard.write_bytes(intact[: len(intact) // 2])
    else:  # the same size, so only the record's SHA-256 tells
        middle = len(intact) // 2
        shard.write_bytes(intact[:middle] + bytes([intact[middle] ^ 0xFF]) + intact[middle + 1:])
    (tmp_path / "ds" / "manifest.json").unlink()
    again = ingest(IdxSource(), url, config)
    assert again == first and shard.read_bytes() == intact
    images, _ = next(iter(ShardDataset(url, "train", batch_size=80, shuffle=False)))
    assert images.shape[0] == 80


def test_finalize_refuses_missing_shards(tmp_path):
    url = str(tmp_path / "ds")
    plan = plan_ingest(IdxSource(), IngestConfig(shard_size=30, max_samples_per_split=60), digest="test")
    results = [write_shard(t, url) for t in plan.tasks[1:]]
    with pytest.raises(ValueError, match=r"no result for shards \['test/shard-000000.tar'\]"):
        finalize_dataset(plan, results, url)
    assert not exists(f"{url}/manifest.json")
    assert "train/shard-000000.tar" in find(url)  # not a refusal of the images: whole shards stay for the next run


def test_process_pool_ingest_on_s3_matches_a_serial_local_one(s3_bucket, tmp_path):
    config = IngestConfig(shard_size=100, max_samples_per_split=300)
    local = ingest(IdxSource(), str(tmp_path / "ds"), config)
    remote = ingest(IdxSource(), f"{s3_bucket.url}/ds", config, processes=2, storage_options=s3_bucket.storage_options)
    assert remote == local
    assert shard_counts(remote) == {"test": [100, 100, 100], "train": [100, 100, 100]}
    for name in ("train/shard-000002.tar", "test/shard-000000.tar"):
        a = list(iter_samples(f"{tmp_path}/ds/{name}"))
        b = list(iter_samples(f"{s3_bucket.url}/ds/{name}", s3_bucket.storage_options))
        assert a == b  # byte-identical samples, whoever wrote them


def test_existing_shards_reingest_as_a_tar_source(tmp_path):
    first = ingest(IdxSource(), str(tmp_path / "a"), IngestConfig(shard_size=40, max_samples_per_split=120))
    source = TarSource(
        {"train": str(tmp_path / "a/train/shard-{000000..000002}.tar"), "test": str(tmp_path / "a/test/*.tar")},
        class_names=tuple(first["class_names"]),
    )
    again = ingest(source, str(tmp_path / "b"), IngestConfig(image_size=16))
    assert shard_counts(again) == shard_counts(first)
    assert again["splits"]["train"]["class_counts"] == first["splits"]["train"]["class_counts"]
    assert again["image_size"] == 16


def test_truncated_source_tar_fails_naming_it(tmp_path):
    ingest(IdxSource(), str(tmp_path / "a"), IngestConfig(shard_size=40, max_samples_per_split=80))
    tar = tmp_path / "a/train/shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    source = TarSource({"train": str(tmp_path / "a/train/*.tar")})
    plan = plan_ingest(source, IngestConfig())
    with pytest.raises(ValueError, match=r"a/train/shard-000001.tar: not a readable tar shard"):
        write_shards(plan.tasks, str(tmp_path / "b"))
    assert not (tmp_path / "b/train/shard-000001.tar").exists()


def test_foreign_tar_becomes_skipped_samples(tmp_path):
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("notes.txt", b"hello"), ("a.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = TarSource({"train": str(path)})
    with pytest.raises(TooManyBadImages, match=r"foreign.tar#notes: no image member \(has: txt\)"):
        ingest(source, str(tmp_path / "ds"), IngestConfig())


def test_missing_source_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: not found"):
        plan_ingest(ImageFolderSource(str(tmp_path / "nowhere")), IngestConfig())
    with pytest.raises(FileNotFoundError, match=r"no train-images-idx3-ubyte\[\.gz\]"):
        plan_ingest(IdxSource(str(tmp_path)), IngestConfig())
