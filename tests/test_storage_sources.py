"""Sources: partitions into shard units, held-out splits, digests that notice change, checked downloads."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from storage.fsutil import md5_file
from storage.ingest import IngestConfig
from storage.sources import FASHION_MNIST_MD5, IdxSource, ImageFolderSource, TarSource, fetch_fashion_mnist, source_digest


def _folder(root, n_per_class=20, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


def test_idx_partition_cuts_row_ranges_per_split(fashion_mnist_dir):
    partition = IdxSource(str(fashion_mnist_dir)).partition(IngestConfig(shard_size=4000))
    assert partition.units["test"] == [(0, 4000), (4000, 8000), (8000, 10000)]
    assert len(partition.units["train"]) == 15 and partition.units["train"][-1] == (56000, 60000)
    assert partition.class_names[0] == "T-shirt/top"


def test_idx_digest_is_stable_and_sees_a_changed_file(fashion_mnist_dir, tmp_path):
    copy = tmp_path / "fm"
    shutil.copytree(fashion_mnist_dir, copy)
    assert source_digest(IdxSource(str(copy))) == source_digest(IdxSource(str(fashion_mnist_dir)))  # content, not place
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes() + b"\0")
    assert source_digest(IdxSource(str(copy))) != source_digest(IdxSource(str(fashion_mnist_dir)))


def test_fetch_checks_md5_sums(fashion_mnist_dir, tmp_path):
    # A local "mirror": the download path of the official one, without the network. Debian
    # re-gzipped the files, so their sums differ from the published ones: take theirs.
    sums = {name: md5_file(str(fashion_mnist_dir / name)) for name in FASHION_MNIST_MD5}
    source = fetch_fashion_mnist(f"memory://{tmp_path.name}/fm", mirror=str(fashion_mnist_dir), md5=sums)
    assert source.partition(IngestConfig(shard_size=10000)).units["test"] == [(0, 10000)]
    bad_mirror = tmp_path / "mirror"
    shutil.copytree(fashion_mnist_dir, bad_mirror)
    name = next(iter(FASHION_MNIST_MD5))
    (bad_mirror / name).write_bytes(b"not the dataset")
    with pytest.raises(ValueError, match=rf"mirror/{name}: MD5 .* differs from the published {sums[name]}"):
        fetch_fashion_mnist(str(tmp_path / "dest"), mirror=str(bad_mirror), md5=sums)
    assert not (tmp_path / "dest" / name).exists()


def test_folder_holdout_is_stable_and_grows_without_moving_files(tmp_path):
    root = _folder(tmp_path / "src")
    config = IngestConfig(holdout_fraction=0.25, shard_size=100)
    before = ImageFolderSource(str(root)).partition(config)
    test_files = {item.ref for unit in before.units["test"] for item in unit}
    assert 4 <= len(test_files) <= 16 and before.class_names == ("a", "b")
    digest = source_digest(ImageFolderSource(str(root)))
    assert source_digest(ImageFolderSource(str(root))) == digest

    _folder(root, n_per_class=30)  # the folder grows: 10 more per class
    after = ImageFolderSource(str(root)).partition(config)
    assert test_files <= {item.ref for unit in after.units["test"] for item in unit}  # old files keep their split
    assert source_digest(ImageFolderSource(str(root))) != digest
    other_seed = ImageFolderSource(str(root)).partition(IngestConfig(holdout_fraction=0.25, seed=1))
    assert other_seed.units["test"] != after.units["test"]


def test_tar_source_holds_out_whole_tars(tmp_path):
    for i in range(10):
        (tmp_path / f"data-{i:02d}.tar").write_bytes(b"")
    source = TarSource(str(tmp_path / "data-{00..09}.tar"))
    units = source.partition(IngestConfig(holdout_fraction=0.2)).units
    assert len(units["test"]) == 2 and len(units["train"]) == 8
    assert not set(units["test"]) & set(units["train"])
    with pytest.raises(ValueError, match=r"at least two tars"):
        TarSource(str(tmp_path / "data-00.tar")).partition(IngestConfig())
    with pytest.raises(ValueError, match=r"max_samples_per_split cannot apply to tar sources"):
        source.partition(IngestConfig(max_samples_per_split=5))


def test_credentials_stay_out_of_repr_and_manifest_description():
    source = ImageFolderSource("s3://bucket/images", storage_options={"secret": "s3cr3t-value"})
    assert "s3cr3t" not in repr(source) and "s3cr3t" not in str(source.describe())
