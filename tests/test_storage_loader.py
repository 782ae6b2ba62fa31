"""The streaming shard loader: shuffling, DDP/worker splitting, resume, S3 workers, bad shards."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from storage.ingest import IngestConfig, ingest
from storage.loader import ShardDataset, iter_shard_batches, shard_loader
from storage.shards import ShardError
from storage.sources import IdxSource, TarSource


@pytest.fixture(scope="module")
def uneven_dataset(tmp_path_factory):
    """Fashion-MNIST train split as 7 shards: six of 60 samples and one of 10 (370 in all)."""
    url = str(tmp_path_factory.mktemp("loader") / "ds")
    ingest(IdxSource(), url, IngestConfig(image_size=8, shard_size=60, max_samples_per_split=370))
    return url


def _keys(dataset: ShardDataset, num_workers: int = 0) -> list[list[int]]:
    """Batches of the loader as lists of the first pixel sums (a cheap per-sample fingerprint)."""
    return [[round(float(x.sum()), 4) for x in images] for images, _ in shard_loader(dataset, num_workers)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_gets_the_same_number_of_batches_and_disjoint_samples(uneven_dataset, world_size):
    ranks = [ShardDataset(uneven_dataset, batch_size=16, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    counts = {len(list(shard_loader(d, num_workers=2))) for d in ranks}
    assert counts == {len(ranks[0])}  # equal batch counts: no rank waits for a collective forever
    pieces = [(url, skip + i) for d in ranks for w in range(2) for url, skip, take, _ in d.segments(w, 2) for i in range(take)]
    assert len(pieces) == len(set(pieces)) == (370 // world_size) * world_size


def test_epoch_covers_the_split_in_a_seeded_order_that_changes_per_epoch(uneven_dataset):
    dataset = ShardDataset(uneven_dataset, batch_size=50, seed=7, shuffle_buffer=100)
    first = _keys(dataset)
    assert _keys(dataset) == first  # same seed and epoch: same order
    dataset.set_epoch(1)
    second = _keys(dataset)
    assert second != first
    assert sorted(sum(first, [])) == sorted(sum(second, []))  # both epochs see the whole split once
    labels = torch.cat([y for _, y in shard_loader(dataset)])
    assert labels.dtype == torch.int64 and len(labels) == 370


def test_batches_are_float_images_in_unit_range(uneven_dataset):
    images, labels = next(iter(shard_loader(ShardDataset(uneven_dataset, batch_size=32))))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.max()) > 0.5
    assert labels.shape == (32,) and int(labels.max()) < 10


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_at_a_batch_continues_the_same_epoch(uneven_dataset, num_workers):
    full = _keys(ShardDataset(uneven_dataset, batch_size=16, seed=5, epoch=2), num_workers)
    resumed = _keys(ShardDataset(uneven_dataset, batch_size=16, seed=5, epoch=2, start_batch=9), num_workers)
    assert resumed == full[9:]


def _batches(dataset: ShardDataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(shard_loader(dataset))


def test_decoded_cache_gives_the_same_batches_and_reads_no_shard_after_the_first_epoch(uneven_dataset, tmp_path):
    import shutil

    copy = str(tmp_path / "ds")
    shutil.copytree(uneven_dataset, copy)
    plain = ShardDataset(copy, batch_size=16, seed=4)
    cached = ShardDataset(copy, batch_size=16, seed=4, decoded_cache_bytes=370 * 8 * 8)  # exactly fits
    too_small = ShardDataset(copy, batch_size=16, seed=4, decoded_cache_bytes=370 * 8 * 8 - 1)
    epochs = [(0, 0), (1, 0), (2, 5)]  # the last resumes mid-epoch
    expected = []
    for epoch, start in epochs:
        plain.set_epoch(epoch, start)
        expected.append(_batches(plain))
    for epoch, start in epochs[:1]:
        cached.set_epoch(epoch, start)
        got = _batches(cached)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected[0], strict=True))
    shards = list((tmp_path / "ds" / "train").glob("*.tar"))
    assert len(shards) == 7
    for shard in shards:
        shard.unlink()  # from now on, the images can only come from the cache
    for (epoch, start), want in zip(epochs[1:], expected[1:]):
        cached.set_epoch(epoch, start)
        got = _batches(cached)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
    with pytest.raises(FileNotFoundError):  # a split that does not fit is read from its shards each epoch
        _batches(too_small)


def test_drop_last_yields_only_full_batches(uneven_dataset):
    dataset = ShardDataset(uneven_dataset, batch_size=100, drop_last=True)
    assert len(dataset) == 3 and [len(y) for _, y in shard_loader(dataset, 2)] == [100, 100, 100]


def test_s3_shards_stream_through_forked_workers(s3_bucket, fashion_mnist_test_split):
    url = f"{s3_bucket.url}/ds"
    ingest(IdxSource(), url, IngestConfig(image_size=28, shard_size=100, max_samples_per_split=300), storage_options=s3_bucket.storage_options)
    # Credentials from the AWS_* environment alone, as in a deployed worker.
    dataset = ShardDataset(url, "test", batch_size=64, shuffle=False)
    images = torch.cat([x for x, _ in shard_loader(dataset, num_workers=2)])
    expected = torch.from_numpy(fashion_mnist_test_split[0][:300]).float().div(255)
    assert len(images) == 300
    # Contiguous worker blocks, taken in turn: worker 0 has batches 0-2 (192 rows), worker 1 the rest.
    order = torch.cat([torch.arange(0, 64), torch.arange(192, 256), torch.arange(64, 128), torch.arange(256, 300), torch.arange(128, 192)])
    torch.testing.assert_close(images[:, 0], expected[order])


def test_truncated_shard_fails_naming_it(tmp_path):
    url = str(tmp_path / "ds")
    ingest(IdxSource(), url, IngestConfig(shard_size=50, max_samples_per_split=100))
    shard = tmp_path / "ds/train/shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 20 * 512 * 3])
    with pytest.raises(ShardError, match=r"train/shard-000001.tar: .*truncated"):
        list(shard_loader(ShardDataset(url, batch_size=10, shuffle=False)))


def test_foreign_tar_fails_naming_the_shard(tmp_path):
    url = str(tmp_path / "ds")
    ingest(IdxSource(), url, IngestConfig(shard_size=50, max_samples_per_split=100))
    with tarfile.open(tmp_path / "ds/test/shard-000000.tar", "w") as tar:
        for i in range(50):
            info = tarfile.TarInfo(f"doc{i}.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ShardError, match=r"test/shard-000000.tar: sample 'doc0' has no 'png' member"):
        list(iter_shard_batches(url, "test", 0, 10))


def test_missing_dataset_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not-here: no manifest.json"):
        ShardDataset(str(tmp_path / "not-here"), batch_size=4)


def test_unlabelled_tar_source_streams_with_class_zero(tmp_path):
    # A tar of bare images (no cls) is a valid unconditional dataset.
    src = tmp_path / "bare.tar"
    with tarfile.open(src, "w") as tar:
        from PIL import Image

        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"img{i}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    ingest(TarSource({"train": str(src)}), str(tmp_path / "ds"), IngestConfig(image_size=8, mode="RGB"))
    images, labels = next(iter(shard_loader(ShardDataset(str(tmp_path / "ds"), batch_size=6, shuffle=False))))
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0] * 6


def test_keep_ratio_stores_whole_images_and_training_crops_a_new_square_each_epoch(tmp_path):
    from PIL import Image

    from storage.imaging import fit
    from storage.sources import ImageFolderSource

    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))  # 64 wide, 32 high: left dark, right light
    assert fit(Image.fromarray(ramp), 16, "L", "keep-ratio").size == (32, 16)  # the ratio kept
    assert fit(Image.new("L", (300, 50)), 16, "L", "keep-ratio").size == (32, 16)  # at most twice as long
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(ramp).save(folder / f"img{i}.png")
    config = IngestConfig(image_size=16, mode="L", holdout_fraction=0, resize="keep-ratio")
    ingest(ImageFolderSource(str(folder), labels="none"), str(tmp_path / "ds"), config)

    def epoch(n: int, num_workers: int = 0) -> torch.Tensor:
        dataset = ShardDataset(str(tmp_path / "ds"), "train", batch_size=8, seed=3, epoch=n)
        images, _ = next(iter(shard_loader(dataset, num_workers=num_workers)))
        return images

    first = epoch(0)
    assert first.shape == (8, 1, 16, 16)
    left_edges = {round(float(img[0, :, 0].mean()), 3) for img in first}
    assert len(left_edges) > 1  # crops fall at different places along the width
    assert torch.equal(epoch(0).sort(0).values, first.sort(0).values)  # the same crops when the epoch is read again
    assert not torch.equal(epoch(1).sort(0).values, first.sort(0).values)  # new ones the next epoch
    centre, _, _ = next(iter_shard_batches(str(tmp_path / "ds"), "train", 0, 8))  # encoding: the centre square
    expected = torch.from_numpy(np.asarray(fit(Image.fromarray(ramp), 16, "L", "keep-ratio"))[:, 8:24] / 255).float()
    assert torch.allclose(centre[0, 0], expected, atol=1e-6)
