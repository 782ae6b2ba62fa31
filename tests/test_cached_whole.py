"""A task is `Cached` only when its artifact is whole: every file its inventory records is
there at its recorded size (one listing, nothing hashed). A file deleted or cut short since
is made again by the next run, which says so in one line; a reader that meets the missing
file first names `vqvae2 verify --root R --repair`."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from flows.parameters import sections_of
from storage.fsutil import exists, join, remove, write_bytes
from tasks.machinery.artifacts import Artifact
from tasks.manifests import Manifest
from pipeline_helpers import differences, log_lines, smoke_config, state_names


def _finished(url: str, options: dict | None) -> Artifact:
    """A finished artifact of two files, its inventory and manifest written as a stage writes them."""
    artifact = Artifact(url, "autoencoder", "k" * 16, options or {})
    for name in ("model.pt", "history.json"):
        write_bytes(artifact.path(name), name.encode() * 10, artifact.storage_options)
    manifest = Manifest(**artifact.identity(), inventory=artifact.write_inventory())
    artifact.marker(Manifest).write(manifest)
    return artifact


@pytest.mark.parametrize("harm", ["deleted", "cut short"])
def test_an_artifact_with_a_file_gone_is_reopened_in_one_line(storage_root, harm, caplog):
    url, options = storage_root
    artifact = _finished(url, options)
    assert artifact.read_whole(Manifest) is not None  # whole: kept as it is
    model = artifact.path("model.pt")
    if harm == "cut short":
        write_bytes(model, b"short", options)
    else:
        remove(model, options)
    with caplog.at_level("WARNING"):
        assert artifact.read_whole(Manifest) is None
    said = {"deleted": "model.pt: missing", "cut short": "model.pt: has 5 bytes, recorded 80"}[harm]
    assert [r.getMessage() for r in caplog.records if "is not whole" in r.getMessage()] == [
        f"{artifact.url} is not whole ({said}): making it again"]
    assert not exists(artifact.path("manifest.json"), options) and not exists(model, options)
    assert exists(artifact.path("history.json"), options)  # what is whole stays: the stage reuses it


@pytest.mark.slow
@pytest.mark.parametrize("case,pattern,redone", [
    ("a deleted model", "autoencoder/*/model.pt", {"train-autoencoder"}),
    # The ingest's plan is Cached by Prefect (kept in its own storage): the dataset is still looked at.
    ("a deleted shard", "datasets/*/train/shard-000001.tar", {"ingest-train-1", "finalize-dataset"}),
])
def test_the_next_run_makes_a_deleted_file_again_and_ends_as_an_undisturbed_run(case, pattern, redone, smoke_run,
                                                                                  tmp_path, capsys):
    from flows.cli import main
    from flows.pipeline import vqvae2_pipeline

    _, smoke_root, state = smoke_run
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    gone = sorted(root.glob(pattern))[0]
    gone.unlink()
    if case == "a deleted model":  # met by a reader first: named, with what mends it
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--root", str(root), "--key", state.result().key, "--out", str(tmp_path / "s.png")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert f"{gone}: missing from a finished training" in err and f"vqvae2 verify --root {root} --repair" in err

    run = vqvae2_pipeline(**sections_of(smoke_config(str(root))), return_state=True)
    assert run.is_completed(), run.message
    states = state_names(run.state_details.flow_run_id)
    again = {re.sub(r"-[0-9a-f]{3}$", "", name) for name, s in states.items()
             if s != "Cached" and not name.startswith("plan-dataset")}
    assert again == redone, states
    said = log_lines(run.state_details.flow_run_id, "is not whole")
    folder = gone.relative_to(root).parts[:2]
    assert said == [f"{join(str(root), *folder)} is not whole ({Path(*gone.relative_to(root).parts[2:])}: missing): "
                    "making it again"], said
    assert differences(root, smoke_root) == {"only here": [], "missing": [], "differ": []}
