"""The `vqvae2` command, as a user types it."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from flows.parameters import sections_of
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


def _stage_grid(root, **sample) -> np.ndarray:
    """The sample stage's first batch (its own seed, the settings given) as `vqvae2 sample
    --scale 1` lays it out; and the batch's labels, the codes' conditioning."""
    import torch

    from flows.pipeline import sample_flow
    from pipeline_helpers import smoke_config
    from tasks.machinery.arrays import load_npz
    from tasks.machinery.reporting import image_grid, png_bytes

    samples = sample_flow(**sections_of(smoke_config(str(root), sample=sample)))
    batch = load_npz(samples.batches[0])
    grid = png_bytes(image_grid(torch.from_numpy(batch["images"]).float() / 255), scale=1)
    return np.asarray(Image.open(io.BytesIO(grid))), batch["labels"]


def _cli_grid(root, key: str, out, *flags: str) -> np.ndarray:
    main(["sample", "--root", str(root), "--key", key, "--out", str(out), "--scale", "1", *flags])
    return np.asarray(Image.open(out))


def test_sample_names_a_class_as_the_sample_stage_does_and_draws_its_images(smoke_run, tmp_path, capsys):
    """`--class 7`, `--class sneaker` and `--class Sneaker` draw what the sample deployment
    draws for `classes: ["Sneaker"]` with the same seed and batch: images conditioned on 7."""
    _, root, state = smoke_run
    stage, labels = _stage_grid(root, num_samples=16, classes=["Sneaker"], batch_size=16)
    assert labels.tolist() == [7] * 16  # the stage conditioned its codes on Sneaker, class 7
    key = state.result().key
    for name in ("7", "sneaker", "Sneaker"):
        drawn = _cli_grid(root, key, tmp_path / f"{name}.png", "--class", name, "-n", "16", "--batch-size", "16")
        assert np.array_equal(drawn, stage), name
    assert "16 images of class Sneaker\n" in capsys.readouterr().out
    other = _cli_grid(root, key, tmp_path / "t-shirts.png", "--class", "0", "-n", "16", "--batch-size", "16")
    assert other.shape == stage.shape and not np.array_equal(other, stage)


def test_sample_refuses_an_unknown_class(smoke_run, tmp_path, capsys):
    _, root, _ = smoke_run
    err = _refused(capsys, ["sample", "--class", "Giraffe", "--out", str(tmp_path / "x.png"), "--preset", "smoke",
                            "--root", str(root)])
    assert "'Giraffe' is no class of the dataset; the dataset's classes are 0 'T-shirt/top', 1 'Trouser'" in err


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
        main(["report", "--preset", "smoke", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "run the `ingest` stage" in capsys.readouterr().err
    # a root that is not there at all is named as such (tests/test_missing_root.py)
    err = _refused(capsys, ["report", "--preset", "smoke", "--root", str(tmp_path / "nothing")])
    assert err.startswith(f"vqvae2: {tmp_path / 'nothing'}: the storage root does not exist"), err


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
    from flows.cli import parser
    from flows.command_config import build_config

    args = parser().parse_args(["run", "--preset", "smoke", *(["--source", source] if source else []),
                                "--set", "num_classes=auto"])
    config = build_config(args)
    assert (config.source.url, config.source.resolved_kind) == (source, kind)
    assert config.classes_from_data and config.with_classes(3).model.num_classes == 3


def test_labels_a_source_kind_does_not_take_are_refused_naming_the_field(capsys):
    err = _refused(capsys, ["report", "--source", "./my-images", "--set", "source.labels=json:label"])
    assert "source.labels is 'json:label', but a source of kind 'image-folder' takes one of auto, folders, none" in err


# --- the command line itself: at once, and every option explained ------------------------------


def test_the_parser_and_its_help_import_neither_torch_nor_prefect():
    """`vqvae2 --help`, and a command's options, answer before any heavy import (bench_cli.py times it)."""
    import sys

    code = "\n".join([
        "import contextlib, io, sys",
        "from flows.cli import parser",
        "for argv in (['run', '--preset', 'smoke', '--source', 'x'], ['ls', '--json'], ['report', '--key', 'ab'],",
        "             ['sample', '--out', 'x.png'], ['reconstruct', '--out', 'x.png'], ['verify', '--repair'],",
        "             ['stage', 'train-priors', '--preset', 'smoke']):",
        "    parser().parse_args(argv)",
        "helps = []",
        "for command in ([], ['run'], ['stage'], ['ls'], ['report'], ['sample'], ['reconstruct'], ['verify'], ['node']):",
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):",
        "        parser().parse_args([*command, '--help'])",
        "    helps.append(out.getvalue())",
        "print(sorted(m for m in ('torch', 'prefect', 'pydantic', 'numpy', 'tasks.config', 'tasks.stages')",
        "             if m in sys.modules))",
        "print(helps[2])",
    ])
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "[]", done.stdout + done.stderr[-2000:]
    # `stage --help` names every stage, in run order, as the declarations do
    listed = " ".join(done.stdout.split()).split("the stage: ")[1]
    assert listed.startswith("ingest, train-classifiers, train-autoencoder, encode, train-priors, sample, evaluate")


def test_the_stage_names_read_from_the_declarations_are_the_stages_in_run_order():
    """`vqvae2 stage` reads the names without importing the stages (flows.stage_names): the same
    names, in the same order, as importing them gives, and the flows `vqvae2 stage NAME` runs."""
    from flows.pipeline import STAGE_FLOWS
    from flows.stage_names import declared_names
    from tasks.stages import STAGES

    assert declared_names() == tuple(stage.name for stage in STAGES) == tuple(STAGE_FLOWS)


def test_ls_and_report_read_the_records_without_loading_torch_or_prefect(smoke_run):
    """What makes them answer at once: a few JSON files read, no model code and no Prefect
    (so no temporary server either), whichever key names the run."""
    import sys

    from tasks.config import config_key

    config, root, state = smoke_run
    code = "\n".join([
        "import contextlib, io, sys",
        "from flows.cli import main",
        "root, key = sys.argv[1:3]",
        "for argv in (['ls'], ['ls', '--json'], ['report'], ['report', '--json'], ['report', '--key', key]):",
        "    with contextlib.redirect_stdout(io.StringIO()) as out:",
        "        main([*argv, '--root', root])",
        "    assert out.getvalue().strip(), argv",
        "print(out.getvalue().splitlines()[0])",
        "print(sorted(m for m in ('torch', 'prefect', 'tasks.stages') if m in sys.modules))",
    ])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", code, str(root), config_key(config)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    said, loaded = done.stdout.splitlines()
    assert said.startswith(f"report of the smoke run {state.result().key} ") and loaded == "[]", done.stdout


def _options(parser):
    """(command, option) of every option of every command, with its argparse action."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield parser.prog, choice.dest, choice
            for sub in action.choices.values():
                yield from _options(sub)
        else:
            yield parser.prog, "/".join(action.option_strings) or action.dest, action


def test_every_command_and_option_has_help_text():
    from flows.cli import parser

    options = list(_options(parser()))
    assert {"vqvae2 ls", "vqvae2 report", "vqvae2 sample"} <= {prog for prog, _, _ in options}
    missing = [f"{prog} {name}" for prog, name, action in options if not (action.help or "").strip()]
    assert not missing, missing


# --- finished runs, found by their root ---------------------------------------------------------


def test_ls_lists_the_finished_runs_under_a_root(smoke_run, capsys):
    config, root, state = smoke_run
    report = state.result()
    key = report.key  # a run is known by its report's key: its folder's name under reports/
    main(["ls", "--root", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "PRESET", "SOURCE", "FINISHED", "SAMPLE", "FID", "REPORT"]
    (row,) = [line for line in lines[1:] if line.startswith(key)]
    assert row.split()[1:3] == ["smoke", "fashion-mnist"] and row.endswith(f"  {report.markdown}")
    assert f"{report.metrics['sample_fid']:.4g}" in row.split()
    main(["ls", "--root", str(root), "--json"])
    listed = json.loads(capsys.readouterr().out)
    (run,) = [r for r in listed if r["key"] == key]
    assert (run["preset"], run["source"], run["num_classes"]) == ("smoke", "fashion-mnist", 10)
    assert run["sample_fid"] == report.metrics["sample_fid"] and run["report"] == report.markdown
    assert [r["finished"] for r in listed] == sorted((r["finished"] for r in listed), reverse=True)  # newest first


def test_report_of_a_root_reads_its_newest_run_or_the_one_named_by_key(smoke_run, capsys):
    from tasks.runs import finished_runs

    config, root, state = smoke_run
    key = state.result().key
    main(["report", "--root", str(root), "--key", key[:6]])  # a start of the key will do
    text = capsys.readouterr().out
    assert text.startswith(f"report of the smoke run {key} on dataset ") and state.result().markdown in text
    main(["report", "--root", str(root), "--key", key, "--json"])
    assert json.loads(capsys.readouterr().out)["metrics"] == state.result().metrics
    newest = finished_runs(str(root))[0].record  # another test may have evaluated another config here since
    main(["report", "--root", str(root)])
    assert capsys.readouterr().out.startswith(f"report of the {newest.preset} run {newest.key} on dataset ")


def test_report_names_a_key_no_run_under_the_root_has_and_lists_what_is_there(smoke_run, capsys):
    from tasks.config import config_key

    config, root, state = smoke_run
    err = _refused(capsys, ["report", "--root", str(root), "--key", "0000000"])
    assert f"--key 0000000: no finished run under {root} has that report, config or artifact key" in err
    assert f"{state.result().key} (config key {config_key(config)})" in err  # what is there, each run's keys


def _one_run_root(smoke_run, tmp_path):
    """A copy of the smoke root holding the smoke run's record alone (other tests may record
    other configs there), so that each of its artifact keys names one run; (root, report key)."""
    import shutil

    _, root, state = smoke_run
    key, copy = state.result().key, tmp_path / "one-run"
    others = lambda folder, names: [n for n in names if folder == str(root / "runs") and n != f"{key}.json"]
    shutil.copytree(root, copy, ignore=others)
    return copy, key


def test_report_takes_any_key_a_person_meets_and_says_which_kind_it_got(smoke_run, tmp_path, capsys):
    """The report key (`ls`), the config key as the UI's tables carry it (`trainings-<key>`, read
    from the run's own artifacts on the Prefect API), and an artifact key (a stage's folder, of
    a root where one run used it)."""
    from pipeline_helpers import artifacts

    _, root, state = smoke_run
    key = state.result().key
    (table,) = [a.key for a in artifacts(state.state_details.flow_run_id) if (a.key or "").startswith("trainings-")]
    short = table.removeprefix("trainings-")
    copy, _ = _one_run_root(smoke_run, tmp_path)
    autoencoder = json.loads((copy / "runs" / f"{key}.json").read_text())["artifacts"]["train-autoencoder"]
    said = {  # --key, on which root: what it says of the key
        (table, root): f"--key {table} is the config key {short} (the UI's trainings-{short} tables); its report key "
                       f"is {key}",
        (short[:6], root): f"--key {short[:6]} is the config key {short} (the UI's trainings-{short} tables); its "
                           f"report key is {key}",
        (autoencoder, copy): f"--key {autoencoder} is the artifact key of train-autoencoder ({autoencoder}); its "
                             f"run's report key is {key}",
        (key[:6], root): None,  # a report key needs no word on its kind
    }
    for (given, where), note in said.items():
        main(["report", "--root", str(where), "--key", given])
        out, err = capsys.readouterr()
        assert out.startswith(f"report of the smoke run {key} on dataset ") and f"{where}/reports/{key}/report.md" in out
        assert err == (f"{note}\n" if note else ""), err
    main(["report", "--root", str(root), "--key", short, "--json"])  # the note on stderr: stdout stays JSON
    assert json.loads(capsys.readouterr().out)["metrics"] == state.result().metrics


def test_an_artifact_key_of_several_runs_names_them_rather_than_pick_one(smoke_run, tmp_path, capsys):
    root, key = _one_run_root(smoke_run, tmp_path)
    record = json.loads((root / "runs" / f"{key}.json").read_text())
    other = "0123456789abcdef"  # a second run of the same dataset: another config's report
    (root / "runs" / f"{other}.json").write_text(json.dumps({**record, "key": other}))
    dataset = record["artifacts"]["ingest"]
    err = _refused(capsys, ["report", "--root", str(root), "--key", dataset.partition("/")[2]])
    assert f"is the artifact key of ingest ({dataset}), which 2 recorded runs use (report keys " in err
    assert key in err and other in err and "give one of them with --key" in err


def test_sample_and_reconstruct_without_out_write_here_a_file_named_after_what_they_drew(
        smoke_run, tmp_path, monkeypatch, capsys):
    _, root, state = smoke_run
    monkeypatch.chdir(tmp_path)
    key = state.result().key
    main(["sample", "--root", str(root), "--key", key, "-n", "4", "--batch-size", "4", "--scale", "1"])
    out = capsys.readouterr().out
    assert ("4 images, 4 classes in turn: 1 each of T-shirt/top, Trouser, Pullover, Dress; none of the other 6 "
            f"(-n 10 draws every class)\nwrote {tmp_path / 'sample-4-classes-4.png'}\n") in out
    assert Image.open(tmp_path / "sample-4-classes-4.png").size == (2 * 17 + 1, 2 * 17 + 1)  # 2 rows of 2 at 16x16
    main(["sample", "--root", str(root), "--key", key, "--class", "7", "-n", "2"])
    assert f"2 images of class Sneaker\nwrote {tmp_path / 'sample-sneaker-2.png'}\n" in capsys.readouterr().out
    main(["reconstruct", "--root", str(root), "--key", key, "--count", "2"])
    assert f"wrote {tmp_path / 'reconstructions-2.png'}\n" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reconstructions-2.png", "sample-4-classes-4.png",
                                                          "sample-sneaker-2.png"]


def test_sample_without_a_class_draws_every_class_in_turn_as_the_sample_stage_does(smoke_run, tmp_path, capsys):
    _, root, state = smoke_run
    stage, labels = _stage_grid(root, num_samples=12, acceptance_rates=[1.0], batch_size=12)
    assert labels.tolist() == [*range(10), 0, 1]  # one of each class in turn
    drawn = _cli_grid(root, state.result().key, tmp_path / "every-class.png", "-n", "12", "--batch-size", "12")
    assert np.array_equal(drawn, stage) and drawn.shape == (3 * 17 + 1, 4 * 17 + 1)  # 3 rows of 4 at 16x16
    # said as drawn: 12 images over 10 classes are not 12 of each
    assert ("12 images, 10 classes in turn: 2 each of T-shirt/top, Trouser; 1 each of Pullover, Dress, Coat, Sandal, "
            "Shirt, Sneaker, Bag, Ankle boot\n") in capsys.readouterr().out


# --- your own images, without a flag ----------------------------------------------------------


def test_a_flat_folder_runs_to_a_report_with_no_set_and_is_listed_under_its_root(
        prefect_api, tmp_path, fashion_mnist_test_split, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId, FlowRunFilter, FlowRunFilterName

    from image_files import write_folder

    images, _ = fashion_mnist_test_split
    folder, root = tmp_path / "my-images", tmp_path / "root"
    write_folder(folder, images[:200])  # flat: no labels, so no classes (the smoke preset has 10)
    main(["run", "--preset", "smoke", "--source", str(folder), "--root", str(root)])
    out = capsys.readouterr().out
    started = re.match(r"run (pipeline-\S+): preset smoke, root ", out)
    assert started, out[:500]
    name = started.group(1)
    finished = re.search(rf"\nrun {name} finished; report ([0-9a-f]{{16}}): {re.escape(str(root))}/reports/\1/report.md\n",
                         out)
    assert finished, out[-1500:]
    key = finished.group(1)
    # The report's card on the run's server, as the flow's log says it too.
    link = re.search(r"^the report in Prefect's UI: (http://127\.0\.0\.1:\d+/artifacts/artifact/[0-9a-f-]{36})$",
                     out, re.M)
    assert link, out[-1500:]
    with get_client(sync_client=True) as client:  # the name printed is the flow run's, as the UI shows it
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[link.group(1)[-36:]])))
    assert flow_run.state.is_completed()
    assert (artifact.key, artifact.flow_run_id) == (f"vqvae2-report-{key}", flow_run.id)
    _an_unlabelled_folders_run(root, key, flow_run.id)

    main(["ls", "--root", str(root), "--json"])
    (run,) = json.loads(capsys.readouterr().out)
    assert (run["key"], run["source"], run["num_classes"]) == (key, str(folder), 0)  # unconditional: no labels
    assert run["report"].startswith(f"{root}/reports/") and os.path.exists(run["report"])
    record = (root / "runs" / f"{key}.json").read_text()
    assert str(root) not in record and "storage" not in json.loads(record)["config"]  # relative, and no storage
    assert json.loads(record)["config"]["overrides"] == {"num_classes": 0}  # the config it ran with: no labels
    main(["report", "--root", str(root)])
    assert capsys.readouterr().out.startswith(f"report of the smoke run {key} on dataset ")
    main(["sample", "--root", str(root), "-n", "4", "--out", str(tmp_path / "mine.png")])  # unconditional: no class
    out = capsys.readouterr().out
    assert f"4 images, unconditional (the priors take no class)\nwrote {tmp_path / 'mine.png'}\n" in out


def _an_unlabelled_folders_run(root, key: str, flow_run_id) -> None:
    """What a folder of mixed formats without labels makes: an unconditional model, no judge,
    rejection off and said so, features learned without labels and named as such."""
    from pipeline_helpers import smoke_config, state_names
    from tasks.stages import FinishedRun, ingest, train_classifier

    finished = FinishedRun(smoke_config(str(root), source={"url": str(root.parent / "my-images")}))
    dataset = finished.get(ingest.STAGE)
    assert finished.config.model.num_classes == 0
    assert dataset.class_names == [] and dataset.source["kind"] == "image_folder"
    assert dataset.num_samples == 200 and dataset.num_skipped == 1
    skipped = [s for split in dataset.splits.values() for s in split.skipped]
    assert (skipped[0].ref, skipped[0].reason) == ("broken.png", "not an image: no format Pillow reads recognises the file")
    classifiers = finished.every(train_classifier.STAGE)
    assert [(c.role, c.target) for c in classifiers] == [("features", "rotations")]
    report = json.loads((root / "reports" / key / "report.json").read_text())
    assert report["samples"]["rejection"].startswith("off: the dataset has no labels")
    extractor = report["fidelity"]["extractor"]
    assert extractor["kind"] == "self-supervised" and "never to Inception or domain FIDs" in extractor["description"]
    assert [row["set"] for row in report["fidelity"]["rows"]] == [
        "real train images (floor)", "reconstructions", "samples, no rejection"]
    assert all("isc_mean" not in row for row in report["fidelity"]["rows"])  # no IS without class logits
    text = (root / "reports" / key / "report.md").read_text()
    assert "Feature space: **self-supervised**" in text and "Rejection sampling: off" in text
    assert "train-classifier-features" in state_names(flow_run_id)
