"""`vqvae2 verify`: a damaged file of a finished root is found and named; `--repair` drops
exactly what is damaged, and the next run makes it again and ends where an undisturbed run
ends. A damaged shard or code chunk met while reading is named, not retried, and points at
`vqvae2 verify --repair`."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flows.parameters import sections_of
from storage.codes import CodeDataset
from storage.fsutil import join, remove, write_bytes
from storage.integrity import DamagedArtifact, damage, inventory
from storage.loader import iter_shard_batches
from tasks.stages import FinishedRun, ingest
from pipeline_helpers import differences, smoke_config, state_names, task_runs


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    """One byte changed, the size kept: only a digest tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _verify(root: Path, *flags: str, capsys) -> tuple[int, str]:
    from flows.cli import main

    try:
        main(["verify", "--root", str(root), *flags])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


CASES: dict[str, tuple[str, Callable[[Path], None], set[str]]] = {
    # what is damaged: (the file, how, the tasks the next run does again besides planning the ingest)
    "a truncated shard": ("datasets/*/train/shard-000001.tar", _truncate, {"ingest-train-1", "finalize-dataset"}),
    "a shard with a byte changed": ("datasets/*/test/shard-000000.tar", _flip, {"ingest-test-0", "finalize-dataset"}),
    "a corrupt code chunk": ("codes/*/codes.zarr/train/level1/c/1/0/0", _flip,
                             {"prepare-codes", "encode-train-1", "finalize-codes"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_verify_names_the_damaged_file_and_repair_makes_the_root_whole(case, smoke_run, tmp_path, capsys):
    from flows.pipeline import vqvae2_pipeline

    pattern, harm, redone = CASES[case]
    _, smoke_root, _ = smoke_run
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    assert _verify(root, capsys=capsys)[0] == 0
    damaged = _first(root, pattern)
    harm(damaged)

    code, out = _verify(root, capsys=capsys)
    assert code == 1 and str(damaged) in out, out
    named = [line for line in out.splitlines() if line.startswith("  damaged:")]
    assert len(named) == 1 and named[0].startswith(f"  damaged: {damaged}: "), out
    code, out = _verify(root, "--repair", capsys=capsys)
    assert code == 0 and "repaired" in out and not damaged.exists(), out

    state = vqvae2_pipeline(**sections_of(smoke_config(str(root))), return_state=True)
    assert state.is_completed(), state.message
    states = state_names(state.state_details.flow_run_id)
    again = {name for name, s in states.items() if s != "Cached" and name != "plan-dataset"}
    assert again == redone, states
    assert differences(root, smoke_root) == {"only here": [], "missing": [], "differ": []}
    assert _verify(root, capsys=capsys)[0] == 0


@pytest.mark.slow
def test_a_damaged_chunk_read_by_a_training_fails_it_once_naming_the_chunk(smoke_run, tmp_path):
    """A later config (another prior) reads codes damaged since they were made: the training
    fails at its first attempt, naming the chunk and `vqvae2 verify`."""
    from flows.pipeline import STAGE_FLOWS

    _, smoke_root, _ = smoke_run
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    for chunk in root.glob("codes/*/codes.zarr/train/level0/c/*/0/0"):
        _flip(chunk)
    config = smoke_config(str(root), overrides={"train_prior.steps": 7})
    state = STAGE_FLOWS["train-priors"](**sections_of(config), return_state=True)
    assert state.is_failed()
    assert "codes.zarr/train: chunk" in state.message and "vqvae2 verify" in state.message, state.message
    failed = [run for run in task_runs(state.state_details.flow_run_id).values() if run.state.is_failed()]
    assert failed and all(run.run_count == 1 for run in failed)


def test_reading_a_damaged_shard_names_it_and_points_at_verify(smoke_run, tmp_path):
    config, smoke_root, _ = smoke_run
    dataset = FinishedRun(config).get(ingest.STAGE)
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    shard = root / "datasets" / dataset.key / "test" / "shard-000000.tar"
    _truncate(shard)
    with pytest.raises(DamagedArtifact, match=rf"^{shard}: .*vqvae2 verify --root"):
        list(iter_shard_batches(str(shard.parents[1]), "test", 0, 64))


def test_reading_a_missing_or_altered_chunk_names_it(smoke_run, tmp_path):
    _, smoke_root, _ = smoke_run
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    codes = _first(root, "codes/*/codes.zarr")
    _flip(codes / "train" / "labels" / "c" / "0")
    with pytest.raises(DamagedArtifact, match=r"codes.zarr/train: chunk 0 .*does not read \(Zstd"):
        CodeDataset(str(codes), "train").chunk(0)
    (codes / "train" / "level0" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(DamagedArtifact, match=r"chunk 1 .*never written: a chunk object is missing"):
        CodeDataset(str(codes), "train").chunk(1)


def test_an_inventory_records_every_file_and_tells_each_kind_of_damage(storage_root):
    """On a disk, memory:// and S3 alike."""
    url, options = storage_root
    folder = join(url, "artifact")
    contents = {name: np.random.default_rng(size).bytes(size) for name, size in
                {"a.bin": 100, "b/c.bin": 50, "d.bin": 10, "d.bin.tmp-0000abcd-1-0123456789ab": 7}.items()}
    for name, data in contents.items():
        write_bytes(join(folder, name), data, options)
    files = inventory(folder, options, known={"a.bin": (100, "recorded")}, exclude=["d.bin"])
    assert sorted(files) == ["a.bin", "b/c.bin"] and files["a.bin"] == (100, "recorded")  # no temporary
    files["a.bin"] = inventory(folder, options)["a.bin"]
    assert damage(folder, files, options) == []
    changed = bytearray(contents["a.bin"])
    changed[50] ^= 0xFF
    write_bytes(join(folder, "a.bin"), bytes(changed), options)
    write_bytes(join(folder, "b/c.bin"), b"short", options)
    assert [(d.path, d.what) for d in damage(folder, files, options)] == [
        ("a.bin", "other bytes than recorded (SHA-256), same size"), ("b/c.bin", "has 5 bytes, recorded 50")]
    remove(join(folder, "a.bin"), options)
    assert damage(folder, files, options)[0].what == "missing"


def _finished_dataset(root: Path, key: str = "0123456789abcdef") -> Path:
    """A small finished dataset artifact, as the ingest stage leaves it (its shards, their
    records, an inventory and its manifest last), made without Prefect: 3 shards of 4 images."""
    from storage.ingest import IngestConfig, ingest as ingest_files
    from storage.sources import ImageFolderSource
    from tasks.machinery.artifacts import Artifact
    from image_files import encoded

    images = root.parent / "images"
    for i in range(12):
        path = images / ("a" if i % 2 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(np.full((8, 8), 20 * i, dtype=np.uint8), "png"))
    artifact = Artifact(str(root), "datasets", key)
    written = ingest_files(ImageFolderSource(str(images)), artifact.url, IngestConfig(image_size=8, shard_size=4,
                                                                                       holdout_fraction=0))
    (root / "datasets" / key / "manifest.json").unlink()  # the stage's manifest replaces storage's
    manifest = ingest.DatasetManifest(**written, **artifact.identity())
    artifact.marker(ingest.DatasetManifest).write(manifest.model_copy(update={"inventory": artifact.write_inventory()}))
    return root / "datasets" / key


@pytest.mark.parametrize("harms, line", [
    ({"train/shard-000001.tar": _truncate}, "repaired datasets/0123456789abcdef: dropped 1 damaged file; the next "
     "run of the config that made it makes it again (the rest is reused)"),
    ({"train/shard-000000.tar": _flip, "train/shard-000002.tar": _truncate},
     "repaired datasets/0123456789abcdef: dropped 2 damaged files; the next run of the config that made them makes "
     "them again (the rest is reused)"),
    ({"train/shard-000001.tar": Path.unlink}, "repaired datasets/0123456789abcdef: 1 damaged file was missing "
     "already; the next run of the config that made it makes it again (the rest is reused)"),
    ({"train/shard-000001.tar": Path.unlink, "train/shard-000002.tar": _flip},
     "repaired datasets/0123456789abcdef: dropped 1 damaged file, and 1 was missing already; the next run of the "
     "config that made them makes them again (the rest is reused)"),
])
def test_repair_says_what_it_dropped_in_the_counts_it_listed(harms, line, tmp_path, capsys):
    dataset = _finished_dataset(tmp_path / "root")
    for name, harm in harms.items():
        harm(dataset / name)
    code, out = _verify(tmp_path / "root", capsys=capsys)
    listed = [row for row in out.splitlines() if row.startswith("  damaged: ")]
    damaged = f"{len(harms)} damaged file" + ("s" if len(harms) > 1 else "")
    assert code == 1 and len(listed) == len(harms) and f"\n{damaged}: `vqvae2 verify --root" in out, out
    assert out.startswith("checked 1 finished artifact (6 files) under "), out
    code, out = _verify(tmp_path / "root", "--repair", capsys=capsys)
    assert code == 0 and out.splitlines()[-1] == line, out
    assert not (dataset / "manifest.json").exists() and all(not (dataset / name).exists() for name in harms)
    assert (dataset / "train" / "shard-000000.tar").exists() != ("train/shard-000000.tar" in harms)  # the rest kept
