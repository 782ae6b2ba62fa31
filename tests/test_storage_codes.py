"""Zarr v3 code arrays: chunk-aligned parallel writers, completion, chunk-efficient reading."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zarr

from storage.codes import (
    ChunkShuffleSampler,
    CodeDataset,
    choose_chunk_rows,
    codes_damage,
    create_codes,
    finish_codes,
    read_codes_info,
    write_codes,
)
from storage.fsutil import filesystem, join

LEVELS = [(4, 4), (8, 8)]  # top first
SHARDS = {"train": [100, 100, 100, 40], "test": [60]}


def _shard_codes(split: str, shard: int, n: int):
    """Deterministic per-shard content, different for every row."""
    rng = np.random.default_rng([len(split), shard])
    codes = [rng.integers(0, 512, (n, h, w)).astype(np.int64) for h, w in LEVELS]
    labels = rng.integers(0, 10, n)
    keys = [f"{split}-{shard:06d}-{i:06d}" for i in range(n)]
    return codes, labels, keys


def _write_shard(url, split, shard, storage_options=None):
    counts = SHARDS[split]
    codes, labels, keys = _shard_codes(split, shard, counts[shard])
    return write_codes(url, split, sum(counts[:shard]), [torch.from_numpy(c) for c in codes], labels, keys,
                       storage_options)


def _expected(split):
    parts = [_shard_codes(split, s, n) for s, n in enumerate(SHARDS[split])]
    return [np.concatenate([p[0][lvl] for p in parts]) for lvl in range(len(LEVELS))], np.concatenate([p[1] for p in parts])


def test_concurrent_writers_of_different_shards_read_back_exactly(storage_root):
    root, options = storage_root
    url = f"{root}/codes/k1/codes.zarr"
    info = create_codes(url, SHARDS, LEVELS, class_names=[str(i) for i in range(10)], attrs={"autoencoder": "abc"}, storage_options=options)
    assert info["splits"]["train"]["chunk_rows"] == 100  # divides every shard offset (100, 200, 300)
    jobs = [(split, s) for split, counts in SHARDS.items() for s in range(len(counts))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: _write_shard(url, *job, options), jobs))
    finish_codes(url, options)

    for split in SHARDS:
        dataset = CodeDataset(url, split, storage_options=options)
        codes, labels = _expected(split)
        assert len(dataset) == len(labels)
        for i in sorted({0, 59, 99, 100, 250, len(labels) - 1} & set(range(len(labels)))):
            levels, label = dataset[i]
            assert [lvl.dtype for lvl in levels] == [torch.int64] * 2 and label == labels[i]
            for level, expected in zip(levels, codes):
                np.testing.assert_array_equal(level.numpy(), expected[i])
    assert read_codes_info(url, options)["autoencoder"] == "abc"
    assert dataset.key(5) == "test-000000-000005"


def _process_writer(url, split, shard):
    _write_shard(url, split, shard)


def test_writer_processes_fill_one_local_group(tmp_path):
    url = str(tmp_path / "codes.zarr")
    create_codes(url, {"train": SHARDS["train"]}, LEVELS)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(url, "train", s)) for s in (0, 1)]
    for p in procs:
        p.start()
    _write_shard(url, "train", 2)
    _write_shard(url, "train", 3)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    finish_codes(url)
    loader = torch.utils.data.DataLoader(CodeDataset(url), batch_size=len(CodeDataset(url)))
    (top, bottom), labels = next(iter(loader))
    codes, expected_labels = _expected("train")
    np.testing.assert_array_equal(top.numpy(), codes[0])
    np.testing.assert_array_equal(bottom.numpy(), codes[1])
    np.testing.assert_array_equal(labels.numpy(), expected_labels)


def test_chunks_are_zstd_compressed_int16(tmp_path):
    url = str(tmp_path / "codes.zarr")
    create_codes(url, SHARDS, LEVELS)
    array = zarr.open_group(url, mode="r")["train/level1"]
    assert array.dtype == np.int16 and array.chunks == (100, 8, 8) and array.shape == (340, 8, 8)
    assert [c.to_dict()["name"] for c in array.metadata.codecs] == ["bytes", "zstd"]


def test_unaligned_or_misshapen_writes_are_refused(tmp_path):
    url = str(tmp_path / "codes.zarr")
    create_codes(url, SHARDS, LEVELS)
    codes, labels, keys = _shard_codes("train", 0, 100)
    with pytest.raises(ValueError, match=r"rows \[10, 110\) of 'train' are not whole chunks of 100 rows"):
        write_codes(url, "train", 10, codes, labels, keys)
    with pytest.raises(ValueError, match=r"level 1 codes are \(100, 4, 4\), expected \(100, 8, 8\)"):
        write_codes(url, "train", 0, [codes[0], codes[0]], labels, keys)
    with pytest.raises(ValueError, match=r"must lie in \[0, 32767\]"):
        write_codes(url, "train", 0, [codes[0], codes[1] + 40000], labels, keys)
    with pytest.raises(ValueError, match=r"chunk_rows=30 does not divide the 'train' shard offsets \[100"):
        create_codes(str(tmp_path / "other.zarr"), SHARDS, LEVELS, chunk_rows=30)


def test_missing_shard_keeps_the_codes_incomplete(tmp_path):
    url = str(tmp_path / "codes.zarr")
    create_codes(url, {"train": SHARDS["train"]}, LEVELS)
    for shard in (0, 1, 3):
        _write_shard(url, "train", shard)
    with pytest.raises(ValueError, match=r"split 'train' row 200 \(shard 2\) was never written"):
        finish_codes(url)
    with pytest.raises(ValueError, match=r"codes are incomplete"):
        CodeDataset(url)
    assert create_codes(url, {"train": SHARDS["train"]}, LEVELS)["complete"] is False  # a retry keeps the rows
    _write_shard(url, "train", 2)
    assert finish_codes(url)["complete"] is True


def test_a_chunk_write_killed_before_its_rename_leaves_no_file_in_the_finished_codes(tmp_path):
    """Zarr writes a local chunk to a temporary `.partial` file, then renames it: a writer
    killed in between leaves that file, and the shard's next write does not replace it."""
    url = str(tmp_path / "codes.zarr")
    create_codes(url, {"train": SHARDS["train"]}, LEVELS)
    for shard in range(len(SHARDS["train"])):
        _write_shard(url, "train", shard)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    killed = tmp_path / "codes.zarr/train/level1/c/3/0/0.843d01227c58485284c51fd729fac30e.partial"
    killed.write_bytes(b"half a chunk")
    _write_shard(url, "train", 3)  # the retry of the killed writer
    assert finish_codes(url)["complete"] is True
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == before
    assert [len(level) for level in CodeDataset(url)[339][0]] == [h for h, _ in LEVELS]


@pytest.mark.parametrize("damage, key", [
    ("truncate", "train/level1/c/3/0/0"),
    ("overwrite", "train/labels/c/2"),  # same size, one byte changed
    ("delete", "train/keys/c/3"),
])
def test_a_shard_is_intact_only_while_its_chunk_objects_match_their_record(storage_root, damage, key):
    root, options = storage_root
    url = f"{root}/codes.zarr"
    create_codes(url, {"train": SHARDS["train"]}, LEVELS, chunk_rows=50, storage_options=options)
    records = [_write_shard(url, "train", shard, options) for shard in range(4)]
    offsets = [0, 100, 200, 300]
    assert sorted(records[1]) == sorted([f"train/level{level}/c/{i}/0/0" for level in (0, 1) for i in (2, 3)]
                                        + [f"train/{name}/c/{i}" for name in ("labels", "keys") for i in (2, 3)])
    assert all(size > 0 for size, _ in records[1].values())
    for shard, (offset, record) in enumerate(zip(offsets, records)):
        assert codes_damage(url, "train", offset, SHARDS["train"][shard], record, options) is None

    fs, path = filesystem(join(url, key), options)
    data = fs.cat_file(path)
    if damage == "truncate":
        fs.pipe_file(path, data[:-3])
    elif damage == "overwrite":
        fs.pipe_file(path, data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        fs.rm(path)
    problem = codes_damage(url, "train", 100, 100, records[1], options)
    assert problem is not None and problem.startswith(f"{url}/{key} (rows [100, 200)) ")
    assert {"truncate": f"has {len(data) - 3} bytes; its record says {len(data)} bytes",
            "overwrite": "has other bytes than its record (SHA-256)",
            "delete": f"is missing; its record says {len(data)} bytes"}[damage] in problem
    for shard in (0, 2, 3):  # the neighbours own other objects
        assert codes_damage(url, "train", offsets[shard], SHARDS["train"][shard], records[shard], options) is None
    assert "not in the chunk objects their record names" in codes_damage(url, "train", 0, 100, records[1], options)

    rewritten = _write_shard(url, "train", 1, options)  # encoding the shard again mends it
    assert rewritten == records[1] and codes_damage(url, "train", 100, 100, rewritten, options) is None


def test_chunk_rows_follow_the_shard_offsets():
    assert choose_chunk_rows([1000] * 5 + [300], row_bytes=2 * 16 * 16) == 1000
    assert choose_chunk_rows([1000] * 5, row_bytes=2 * (32 * 32 + 64 * 64)) == 100  # ~1 MiB cap
    assert choose_chunk_rows([997, 1000, 1000], row_bytes=512) == 1  # a skipped image: still never shared
    assert choose_chunk_rows([640], row_bytes=512) == 640


@pytest.fixture
def complete_codes(tmp_path):
    url = str(tmp_path / "codes.zarr")
    create_codes(url, {"train": SHARDS["train"]}, LEVELS, chunk_rows=20)  # 17 chunks
    for shard in range(4):
        _write_shard(url, "train", shard)
    finish_codes(url)
    return url


def test_chunk_shuffle_reads_each_chunk_once_per_epoch(complete_codes, monkeypatch):
    dataset = CodeDataset(complete_codes, cache_chunks=4)
    loads = []
    real_chunk = CodeDataset.chunk

    def counting_chunk(self, index):
        if index not in self._opened()[1]:
            loads.append(index)
        return real_chunk(self, index)

    monkeypatch.setattr(CodeDataset, "chunk", counting_chunk)
    sampler = ChunkShuffleSampler(dataset, seed=1, epoch=0)
    order = list(sampler)
    assert sorted(order) == list(range(340))  # a permutation of all rows
    assert order != sorted(order)
    for i in order:
        dataset[i]
    assert sorted(loads) == list(range(dataset.num_chunks))  # 17 chunks, each read once
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_chunk_shuffle_gives_ranks_equal_disjoint_shares(complete_codes):
    dataset = CodeDataset(complete_codes)
    shares = [list(ChunkShuffleSampler(dataset, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shares] == [113, 113, 113]
    assert len(set(sum(shares, []))) == 339
    resumed = list(ChunkShuffleSampler(dataset, seed=2, rank=1, world_size=3, start=50))
    assert resumed == shares[1][50:]


def test_s3_codes_load_in_dataloader_workers(s3_bucket):
    url = f"{s3_bucket.url}/codes.zarr"
    create_codes(url, {"train": SHARDS["train"]}, LEVELS, storage_options=s3_bucket.storage_options)
    for shard in range(4):
        _write_shard(url, "train", shard, s3_bucket.storage_options)
    finish_codes(url, s3_bucket.storage_options)
    dataset = CodeDataset(url, storage_options=s3_bucket.storage_options)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=ChunkShuffleSampler(dataset), num_workers=2)
    seen = torch.cat([labels for _, labels in loader])
    assert len(seen) == 340 and sorted(seen.tolist()) == sorted(_expected("train")[1].tolist())


def test_missing_codes_fail_naming_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.zarr: no codes group there"):
        CodeDataset(str(tmp_path / "nothing.zarr"))
