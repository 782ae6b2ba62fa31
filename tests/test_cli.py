"""The `vqvae2` command, as a user types it."""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from storage.loader import iter_shard_batches

pytestmark = pytest.mark.slow


def _cli(smoke_run, *args: str) -> None:
    config, root, _ = smoke_run
    main([*args, "--preset", "smoke", "--root", str(root)])


def _refused(capsys, argv: list[str]) -> str:
    """What `vqvae2 argv` prints when it refuses its input: one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_sample_writes_a_grid_of_the_requested_class(smoke_run, tmp_path, capsys):
    out = tmp_path / "sneakers.png"
    _cli(smoke_run, "sample", "--class", "Sneaker", "-n", "6", "--out", str(out), "--scale", "2")
    grid = np.asarray(Image.open(out))
    # 6 images of 16x16 in 2 rows of 3 with 1-pixel gaps, enlarged twice
    assert grid.shape == (2 * (2 * 17 + 1), 2 * (3 * 17 + 1))
    assert f"wrote {out}" in capsys.readouterr().out


def test_sample_refuses_an_unknown_class(smoke_run, tmp_path, capsys):
    _, root, _ = smoke_run
    err = _refused(capsys, ["sample", "--class", "Giraffe", "--out", str(tmp_path / "x.png"), "--preset", "smoke",
                            "--root", str(root)])
    assert "unknown class 'Giraffe'; the dataset has: T-shirt/top, Trouser" in err


def test_reconstruct_given_images_and_held_out_ones(smoke_run, tmp_path, fashion_mnist_test_split, capsys):
    images, _ = fashion_mnist_test_split
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"in{i}.png")
        Image.fromarray(images[i]).resize((40, 40)).save(paths[-1])  # any size: fitted like at ingest
    _cli(smoke_run, "reconstruct", "--images", *map(str, paths), "--out", str(tmp_path / "given.png"))
    assert "3 images, reconstruction MSE" in capsys.readouterr().out
    _cli(smoke_run, "reconstruct", "--count", "4", "--out", str(tmp_path / "held.png"))
    printed = re.search(r"4 images, reconstruction MSE (\S+)", capsys.readouterr().out)
    assert printed
    held = np.asarray(Image.open(tmp_path / "held.png"))
    # 4 pairs of 16x16 images, 2 pairs a row: 2 rows of 4 cells with 1-pixel white gaps, enlarged 4 times
    assert held.shape == (4 * (2 * 17 + 1), 4 * (4 * 17 + 1))
    grid = held[::4, ::4]
    assert np.array_equal(held, grid.repeat(4, axis=0).repeat(4, axis=1))
    assert (grid[::17] == 255).all() and (grid[:, ::17] == 255).all()
    # Pair k (reading order): the k-th held-out test image exactly as stored in the dataset's
    # shards, then its reconstruction: close to it, not a copy, and the one the CLI measured.
    _, root, _ = smoke_run
    (dataset,) = [d for d in (root / "datasets").iterdir() if (d / "manifest.json").exists()]
    stored, _, _ = next(iter_shard_batches(str(dataset), "test", 0, 4))
    stored = (stored[:, 0].numpy() * 255).round().astype(np.uint8)
    cell = [[grid[1 + 17 * r:17 + 17 * r, 1 + 17 * c:17 + 17 * c] for c in range(4)] for r in range(2)]
    originals = np.stack([cell[k // 2][2 * (k % 2)] for k in range(4)])
    reconstructions = np.stack([cell[k // 2][2 * (k % 2) + 1] for k in range(4)])
    assert np.array_equal(originals, stored)
    assert all(not np.array_equal(r, o) for r, o in zip(reconstructions, originals))
    mse = np.mean((reconstructions / 255 - originals / 255) ** 2)
    assert mse < 0.1 and mse == pytest.approx(float(printed.group(1)), abs=2e-3)  # uint8 rounding: < 1.3e-3


def test_report_prints_the_metrics_of_the_finished_run(smoke_run, capsys):
    _, _, state = smoke_run
    _cli(smoke_run, "report", "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"] == state.result().metrics
    _cli(smoke_run, "report")
    text = capsys.readouterr().out
    assert "recon_mse" in text and "report of the smoke run" in text


def test_report_of_a_run_that_never_happened_names_the_missing_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--preset", "smoke", "--root", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "run the `ingest` stage" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["sample", "-n", "0"], "argument -n: must be >= 1, got 0"),
    (["sample", "--batch-size", "-2"], "argument --batch-size: must be >= 1, got -2"),
    (["sample", "--scale", "two"], "argument --scale: expected an integer >= 1, got 'two'"),
    (["reconstruct", "--count", "0"], "argument --count: must be >= 1, got 0"),
])
def test_a_bad_positive_integer_is_refused_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--preset", "smoke", "--out", "x.png"])
    assert exit_info.value.code == 2  # argparse's usage error, before anything runs
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, reason", [
    ('{"preset": "smoke",', "not valid JSON: Expecting property name enclosed in double quotes"),
    ("[1, 2]", "expected a JSON object, got list"),
    (None, "No such file or directory"),
])
def test_a_config_file_that_cannot_be_read_is_refused_naming_it(tmp_path, text, reason, capsys):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    assert f"vqvae2: --config {path}: {reason}" in _refused(capsys, ["report", "--config", str(path)])


def test_a_bad_setting_is_refused_with_the_field_named(capsys):
    assert "autoencoder.chanels" in _refused(capsys, ["report", "--preset", "smoke", "--set", "autoencoder.chanels=3"])


@pytest.mark.parametrize("setting, message", [
    ("ingest.max_bad_fraction=2", "invalid configuration: ingest.max_bad_fraction must be a number in [0, 1), got 2"),
    ("ingest.shard_size=0", "invalid configuration: ingest.shard_size must be a positive integer, got 0"),
    ("sample.temperature=-1", "invalid configuration: sample.temperature: Input should be greater than 0"),
    ("training.checkpoint_every=many", "invalid configuration: training.checkpoint_every: Input should be a valid "
                                       "integer"),
])
def test_config_errors_name_the_set_key_not_the_class(setting, message, capsys):
    err = _refused(capsys, ["report", "--preset", "smoke", "--set", setting])
    assert message in err and "ShardingOptions" not in err and "validation error for" not in err


def test_the_installed_command_runs_a_stage_with_ephemeral_prefect(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # 25-image shards: ~180 task runs, enough to leave the temporary server's event
    # recorder behind the run when the process exits
    done = subprocess.run(["vqvae2", "stage", "ingest", "--preset", "smoke", "--root", str(tmp_path / "root"),
                           "--set", "ingest.shard_size=25"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # stopped only once it has recorded every task run, the server prints no tracebacks
    assert "Traceback" not in done.stderr and "| ERROR" not in done.stderr, done.stderr[-3000:]
    manifest = json.loads(done.stdout[done.stdout.index("{"):])
    assert manifest["num_samples"] == 4000 and (tmp_path / "root" / "datasets" / manifest["key"] / "manifest.json").exists()


@pytest.mark.parametrize("source, kind", [
    ("./my-images", "image-folder"), ("s3://bucket/photos.parquet", "list"), ("/data/list.CSV", "list"),
    ("s3://bucket/laion/{00000..00099}.tar", "tars"), (None, "fashion-mnist"),
])
def test_source_takes_its_kind_from_the_url(source, kind):
    from flows.cli import build_config, parser

    args = parser().parse_args(["run", "--preset", "smoke", *(["--source", source] if source else []),
                                "--set", "num_classes=auto"])
    config = build_config(args)
    assert (config.source.url, config.source.resolved_kind) == (source, kind)
    assert config.classes_from_data and config.with_classes(3).model.num_classes == 3


def test_labels_a_source_kind_does_not_take_are_refused_naming_the_field(capsys):
    err = _refused(capsys, ["report", "--source", "./my-images", "--set", "source.labels=json:label"])
    assert "source.labels is 'json:label', but a source of kind 'image-folder' takes one of auto, folders, none" in err
