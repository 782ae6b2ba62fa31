"""Artifact store and checkpoints: content keys, manifest-last completion, cleaning, atomic checkpoints."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from storage.artifacts import (
    artifact_key,
    artifact_url,
    clean_incomplete,
    list_artifacts,
    read_manifest,
    save_png,
    write_manifest,
)
from storage.checkpoints import checkpoint_url, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from storage.fsutil import exists, read_bytes, write_bytes


@dataclasses.dataclass
class _Section:
    lr: float = 3e-4
    channels: int = 128


@dataclasses.dataclass
class _SectionGrown:
    """`_Section` after a release added a setting, marked as added."""

    lr: float = 3e-4
    channels: int = 128
    ema_decay: float = dataclasses.field(default=0.0, metadata={"in_key": "when set"})


@dataclasses.dataclass
class _Model:
    sections: tuple


def test_a_setting_added_at_its_default_leaves_every_key_as_it_was():
    from typing import Annotated

    from pydantic import BaseModel

    from storage.artifacts import IN_KEY_WHEN_SET

    class Before(BaseModel):
        section: _Section
        seed: int = 0

    class After(BaseModel):
        section: _SectionGrown
        seed: int = 0
        top_p: Annotated[float | None, IN_KEY_WHEN_SET] = None

    def key(settings) -> str:
        return artifact_key("samples", settings, {"priors": "p"}, "2")

    before = key(Before(section=_Section()))
    assert key(After(section=_SectionGrown())) == before  # upgraded: the artifact made before is found
    assert key(After(section=_SectionGrown(), top_p=0.9)) != before  # set: another artifact
    assert key(After(section=_SectionGrown(ema_decay=0.999))) != before  # set deep inside: another too
    assert key(_Model((_SectionGrown(), _SectionGrown(ema_decay=0.5)))) != key(_Model((_Section(), _Section())))
    assert key(_Model((_SectionGrown(), _SectionGrown()))) == key(_Model((_Section(), _Section())))


def test_artifact_key_is_stable_and_changes_with_every_input():
    key = artifact_key("train_prior", {"b": 1, "a": [1, 2]}, ["ds1", "ae1"], "3")
    assert key == artifact_key("train_prior", {"a": [1, 2], "b": 1}, ["ds1", "ae1"], "3")  # key order is irrelevant
    assert len(key) == 16 and int(key, 16) >= 0
    others = {
        artifact_key("train_classifier", {"b": 1, "a": [1, 2]}, ["ds1", "ae1"], "3"),
        artifact_key("train_prior", {"b": 2, "a": [1, 2]}, ["ds1", "ae1"], "3"),
        artifact_key("train_prior", {"b": 1, "a": [1, 2]}, ["ds2", "ae1"], "3"),
        artifact_key("train_prior", {"b": 1, "a": [1, 2]}, ["ds1", "ae1"], "4"),
    }
    assert key not in others and len(others) == 4
    assert artifact_key("s", _Section(), [], "1") == artifact_key("s", {"lr": 3e-4, "channels": 128}, [], "1")
    with pytest.raises(ValueError, match="no canonical JSON form"):
        artifact_key("s", {"f": object()}, [], "1")


def test_manifest_written_last_marks_completion(tmp_path):
    root = str(tmp_path)
    done, partial = artifact_url(root, "encode", "aaa"), artifact_url(root, "encode", "bbb")
    write_bytes(f"{done}/codes.bin", b"x")
    write_bytes(f"{partial}/codes.bin", b"half")
    assert read_manifest(partial) is None and list_artifacts(root, "encode") == []
    write_manifest(done, {"rows": 3})
    assert read_manifest(done) == {"rows": 3}
    assert list_artifacts(root, "encode") == ["aaa"]


def test_clean_incomplete_spares_fresh_and_complete_dirs(tmp_path):
    root = str(tmp_path)
    write_manifest(artifact_url(root, "sample", "done"), {})
    write_bytes(f"{artifact_url(root, 'sample', 'old')}/part.bin", b"x")
    write_bytes(f"{artifact_url(root, 'sample', 'fresh')}/part.bin", b"x")
    an_hour_ago = time.time() - 7200
    os.utime(tmp_path / "sample/old/part.bin", (an_hour_ago, an_hour_ago))
    removed = clean_incomplete(root)
    assert removed == [artifact_url(root, "sample", "old")]
    assert exists(artifact_url(root, "sample", "fresh")) and exists(artifact_url(root, "sample", "done"))
    assert clean_incomplete(root, "sample", min_age_s=0) == [artifact_url(root, "sample", "fresh")]


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_checkpoints_save_atomically_and_resume_from_the_latest(kind, tmp_path, request):
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        run, options = f"{bucket.url}/train/k/ckpt", bucket.storage_options
    else:
        run, options = f"memory://{tmp_path.name}/ckpt", None
    assert latest_checkpoint(run, options) is None
    for step in (100, 2000, 300):
        save_checkpoint(checkpoint_url(run, step), {"step": step, "w": torch.full((3,), float(step)), "rng": torch.get_rng_state()}, options)
    latest = latest_checkpoint(run, options)
    assert latest == checkpoint_url(run, 2000)
    state = load_checkpoint(latest, options)
    assert state["step"] == 2000 and torch.equal(state["w"], torch.full((3,), 2000.0))

    class NotTensors:
        def __reduce__(self):
            raise RuntimeError("cannot pickle mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        save_checkpoint(checkpoint_url(run, 5000), {"step": 5000, "bad": NotTensors()}, options)
    assert latest_checkpoint(run, options) == checkpoint_url(run, 2000)  # the failed save left nothing
    assert prune_checkpoints(run, keep=1, storage_options=options) == [checkpoint_url(run, 100), checkpoint_url(run, 300)]


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    url = str(tmp_path / "evil.pt")
    torch.save({"obj": _Section()}, url)
    with pytest.raises(Exception, match="weights_only"):
        load_checkpoint(url)


def test_save_png_round_trips_a_uint8_grid(tmp_path):
    grid = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    save_png(str(tmp_path / "r/grid.png"), grid)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r/grid.png")), grid)
    save_png(str(tmp_path / "gray.png"), grid[:, :, :1])
    assert read_bytes(str(tmp_path / "gray.png"))[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"need a uint8 H x W"):
        save_png(str(tmp_path / "x.png"), grid.astype(np.float32))
