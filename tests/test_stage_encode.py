"""The encode stage resumes by reusing finished shards only while their code chunks match their record."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS
from storage.codes import CodeDataset
from tasks.stages import encode
from tasks.stages.encode import EncodedShard
from tasks.stages import FinishedRun
from pipeline_helpers import log_lines, smoke_config, state_names

pytestmark = pytest.mark.slow


def test_a_resumed_encoding_encodes_again_only_the_shard_whose_chunks_were_damaged(smoke_run, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_run[1], root)  # the session's smoke run, in a root of this test's own
    config = smoke_config(str(root))
    codes = FinishedRun(config).get(encode.STAGE)
    artifact = Path(codes.url)
    markers = sorted((artifact / "units").glob("shard-train-*.json"))
    assert len(markers) > 1
    shard = EncodedShard.model_validate_json(markers[1].read_bytes())
    assert shard.chunks and all(size > 0 for size, _ in shard.chunks.values())

    # An encoding "interrupted" before it finished, whose shard 1 lost the end of a chunk since.
    (artifact / "manifest.json").unlink()
    damaged = next(key for key in shard.chunks if key.startswith("train/level1/"))
    chunk = artifact / "codes.zarr" / damaged
    chunk.write_bytes(chunk.read_bytes()[:-5])
    state = STAGE_FLOWS["encode"](**sections_of(config), return_state=True)
    assert state.result().key == codes.key
    states = {name: s for name, s in state_names(state.state_details.flow_run_id).items() if name.startswith("encode-")}
    assert states.pop("encode-train-1") == "Completed"
    assert states and set(states.values()) == {"Cached"}
    assert log_lines(state.state_details.flow_run_id, f"{damaged} (rows [{shard.offset}, ")
    assert EncodedShard.model_validate_json(markers[1].read_bytes()) == shard  # encoding is deterministic
    assert state.result().codes == str(artifact / "codes.zarr")
    dataset = CodeDataset(state.result().codes)
    assert dataset.chunk(dataset.num_chunks - 1)  # every chunk decodes
