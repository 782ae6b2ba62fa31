"""Input a new user gives by mistake, refused before anything runs, in one line that names
the field, the file or the URL, never a secret: credentials in URLs (config fields and list
rows), an empty source, list rows outside the list's folder, labels that leave classes
empty, a missing source, a web server that never answers; and every failure of the CLI
in one line, its traceback only with `--debug`. Real files, a real local HTTP server on
127.0.0.1, the CLI in-process and as the installed command."""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from storage.fsutil import write_bytes
from storage.ingest import IngestConfig, ingest
from storage.sources import ListSource, TarSource
from image_files import csv_list, encoded, png_file, tar_bytes
from installed_cli import installed, prefect_started

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # not on stderr, which the tests read
        pass


@contextlib.contextmanager
def _serving(folder: Path):
    """A local HTTP server on 127.0.0.1 serving `folder`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers; yields its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for connection in accepted:
        connection.close()


def _refused(capsys, argv: list[str], code: int = 2) -> str:
    """`vqvae2 argv` in-process: it fails with `code` and one line on stderr, no traceback; that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert err.count("\n") == 1 and err.startswith("vqvae2: ") and "Traceback" not in err, err
    return err


def _files_holding(folder: Path, text: str) -> list[str]:
    """Every file under `folder` whose name or bytes hold `text`."""
    found = []
    for path in folder.rglob("*") if folder.exists() else ():
        if text in str(path) or (path.is_file() and text.encode() in path.read_bytes()):
            found.append(str(path))
    return found


# --- a secret in a URL ---------------------------------------------------------------------


@pytest.mark.parametrize("args, field", [
    (["--root", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"], "storage.root"),
    (["--root", f"AKIAEXAMPLE:{SECRET}@bucket/runs"], "storage.root"),  # the scheme forgotten: a local path
    (["--source", f"s3://AKIAEXAMPLE:{SECRET}@bucket/images"], "source.url"),
    (["--source", f"https://{SECRET}@127.0.0.1:9/list.csv"], "source.url"),  # a bare user part: a token
    (["--set", f'storage.storage_options={{"endpoint_url": "http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9"}}'],
     "storage.storage_options.endpoint_url"),
])
def test_a_secret_in_a_url_is_refused_at_once_and_kept_nowhere(tmp_path, args, field):
    home, root = tmp_path / "prefect-home", tmp_path / "root"
    argv = ["run", "--preset", "smoke", *(["--root", str(root)] if "--root" not in args else []), *args]
    done, seconds = installed(argv, home, cwd=tmp_path)
    assert done.returncode == 2 and not prefect_started(home), (done.returncode, seconds, done.stderr)
    assert done.stderr.count("\n") == 1 and f"vqvae2: invalid configuration: {field} holds a user name or password" \
        in done.stderr, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert _files_holding(tmp_path, SECRET) == []  # Prefect's home (database, logs), the root, the folder it ran in


def test_a_list_row_with_a_secret_is_refused_naming_the_row_not_the_value(tmp_path, capsys):
    listing = csv_list(tmp_path / "data" / "list.csv", ["img/a.png", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x.png"])
    png_file(tmp_path / "data" / "img" / "a.png")
    for call in (ListSource(str(listing)).check, lambda: ListSource(str(listing)).partition(IngestConfig())):
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value).startswith(f"{listing}: row 2 (line 3) hold a user name or password")
        assert SECRET not in str(caught.value)

    served = tmp_path / "web"
    (served / "lists").mkdir(parents=True)
    (served / "lists" / "list.jsonl").write_text(json.dumps({"url": "img/a.png"}) + "\n"
                                                 + json.dumps({"url": f"http://u:{SECRET}@127.0.0.1:9/x.png"}) + "\n")
    with _serving(served) as base:
        err = _refused(capsys, ["run", "--preset", "smoke", "--root", str(tmp_path / "root"),
                                "--source", f"{base}/lists/list.jsonl"])
    assert f"vqvae2: {base}/lists/list.jsonl: row 2 (line 2) hold a user name or password" in err
    assert SECRET not in err and not (tmp_path / "root").exists()


# --- silently wrong input --------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--source", "", "source.url is empty: give a folder, a list file or a .tar pattern"),
    ("--source", "   ", "source.url is empty"),
    ("--root", "", "storage.root must not be empty"),
])
def test_an_empty_source_or_root_is_refused_not_replaced_by_the_default(option, value, message, capsys):
    assert message in _refused(capsys, ["run", "--preset", "smoke", option, value])


def test_a_local_list_reads_files_in_its_folder_only_unless_allowed(tmp_path):
    data = tmp_path / "data"
    png_file(data / "img" / "a.png", 1)
    png_file(data / "img" / "b.png", 2)
    private = png_file(tmp_path / "private.png", 3)  # any file the worker can read, outside the list's folder
    rows = ["img/a.png", str(data / "img" / "b.png"), str(private), f"file://{private}", "../private.png",
            "img/../../private.png", "http://127.0.0.1:9/web.png"]
    listing = csv_list(data / "list.csv", rows)
    with pytest.raises(ValueError) as caught:
        ListSource(str(listing)).check()
    message = str(caught.value)
    assert message.startswith(f"{listing}: row 3 (line 4) ({private}), row 4 (line 5) (file://{private}), "
                              "row 5 (line 6) (../private.png), row 6 (line 7) (img/../../private.png) lie outside "
                              f"the list's folder {data}")
    assert "set source.allow_outside=true" in message and "row 1 " not in message and "row 7 " not in message

    allowed = ListSource(str(listing), allow_outside=True)
    partition = allowed.partition(IngestConfig(holdout_fraction=0))
    with allowed.open() as reader:
        read = {item.ref: item.data for unit in partition.units["train"] for item in reader.read("train", unit)}
    assert read[str(private)] == private.read_bytes() and read["img/a.png"] == (data / "img" / "a.png").read_bytes()


def test_the_config_hands_allow_outside_to_a_list_source_only():
    from tasks.config import pipeline_config

    config = pipeline_config("smoke", source={"url": "/data/list.csv", "allow_outside": True})
    assert config.build_source().allow_outside is True
    assert pipeline_config("smoke", source={"url": "/data/list.csv"}).build_source().allow_outside is False
    with pytest.raises(ValueError, match="source.allow_outside applies to a list source, not to kind 'image-folder'"):
        pipeline_config("smoke", source={"url": "/data/images", "allow_outside": True})


def test_a_list_served_over_http_cannot_pull_local_files(tmp_path, capsys):
    private = png_file(tmp_path / "private.png", 3)
    served = tmp_path / "web"
    png_file(served / "lists" / "img" / "a.png", 1)
    png_file(served / "b.png", 2)
    with _serving(served) as base:
        rows = ["img/a.png", f"{base}/b.png", str(private), f"file://{private}", "../b.png"]
        csv_list(served / "lists" / "list.csv", rows)
        url = f"{base}/lists/list.csv"
        with pytest.raises(ValueError) as caught:
            ListSource(url).partition(IngestConfig())  # what the ingest does, deployed or not
        err = _refused(capsys, ["run", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source", url])
        csv_list(served / "lists" / "web.csv", ["img/a.png", f"{base}/b.png"])
        manifest = ingest(ListSource(f"{base}/lists/web.csv"), str(tmp_path / "ds"),
                          IngestConfig(image_size=8, holdout_fraction=0))
    for message in (str(caught.value), err):
        assert f"{url}: row 3 (line 4) ({private}), row 4 (line 5) (file://{private}), row 5 (line 6) (../b.png) " \
               f"lie outside the list's folder {base}/lists" in message
        assert "never a local file, the list being remote" in message
    assert manifest["num_samples"] == 2  # relative rows and URLs on any http(s) host: a list as usual


def test_an_object_store_list_reads_its_own_folder_not_another_bucket():
    write_bytes("memory://input-checks/lists/list.csv", b"path\nsub/a.png\nmemory://input-checks/lists/sub/b.png\n")
    ListSource("memory://input-checks/lists/list.csv").check()
    write_bytes("memory://input-checks/lists/other.csv", b"path\nmemory://other-bucket/a.png\n")
    with pytest.raises(ValueError, match=r"other\.csv: row 1 \(line 2\) \(memory://other-bucket/a\.png\) lie outside"):
        ListSource("memory://input-checks/lists/other.csv").check()


def _labelled_tar(path: Path, labels: list[int], first: int) -> None:
    members = []
    for i, label in enumerate(labels):
        pixels = np.full((8, 8), 20 * (first + i) % 255, dtype=np.uint8)
        members += [(f"{first + i:06d}.png", encoded(pixels, "png")), (f"{first + i:06d}.cls", b"%d" % label)]
    path.write_bytes(tar_bytes(members))


def test_a_label_seen_once_beyond_the_classes_fails_naming_its_sample(tmp_path):
    labels = [i % 3 for i in range(24)]
    labels[13] = 9  # one sample in a 3-class set: classes 3 to 8 would have no image
    _labelled_tar(tmp_path / "00000.tar", labels[:12], 0)
    _labelled_tar(tmp_path / "00001.tar", labels[12:], 12)
    config = IngestConfig(image_size=8, holdout_fraction=0)
    with pytest.raises(ValueError) as caught:
        ingest(TarSource(f"{tmp_path}/*.tar"), str(tmp_path / "ds"), config)
    message = str(caught.value)
    assert "leave 6 of 10 classes (0 to 9) without any image: 3-8" in message
    assert f"{tmp_path}/00001.tar#000013 (label 9)" in message and "source.class_names" in message
    assert not (tmp_path / "ds").exists()  # no manifest, nor shards that would only be refused again

    names = tuple(f"class{i}" for i in range(10))  # declared: empty classes are the user's choice
    manifest = ingest(TarSource(f"{tmp_path}/*.tar", class_names=names), str(tmp_path / "named"), config)
    assert manifest["class_names"] == list(names) and manifest["splits"]["train"]["class_counts"][3:9] == [0] * 6


def test_labels_counted_from_one_name_the_empty_class_zero(tmp_path):
    _labelled_tar(tmp_path / "00000.tar", [1, 2, 3] * 4, 0)
    with pytest.raises(ValueError, match=r"leave 1 of 4 classes \(0 to 3\) without any image: 0\. Samples labelled "
                                         r"above class 0: .*#000000 \(label 1\), .* and 7 more"):
        ingest(TarSource(str(tmp_path / "00000.tar")), str(tmp_path / "ds"), IngestConfig(image_size=8, holdout_fraction=0))


# --- slow failures and raw tracebacks --------------------------------------------------------


def test_a_missing_source_fails_at_once_naming_it(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    err = _refused(capsys, ["run", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source", str(missing)])
    assert f"vqvae2: {missing}: not found (no such folder)" in err
    done, seconds = installed(["run", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source",
                                str(missing)], tmp_path / "home", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr == err and not prefect_started(tmp_path / "home"), done.stderr
    assert not (tmp_path / "root").exists()  # before anything ran


@pytest.mark.parametrize("path", ["/list.csv", "/folder"])
def test_a_web_source_that_never_answers_fails_after_the_timeout_naming_it(silent_server, tmp_path, path, capsys):
    url = f"{silent_server}{path}"
    started = time.monotonic()
    err = _refused(capsys, ["run", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source", url,
                            "--set", "source.timeout_s=1"], code=1)
    assert 0.9 < time.monotonic() - started < 10
    assert f"vqvae2: TimeoutError: {url}: no answer within 1 s (source.timeout_s)" in err


def test_an_image_of_a_list_whose_server_never_answers_is_a_named_skip(silent_server, tmp_path):
    listing = csv_list(tmp_path / "list.csv", [f"img{i}.png" for i in range(3)] + [f"{silent_server}/late.png"])
    for i in range(3):
        png_file(tmp_path / f"img{i}.png", i)
    config = IngestConfig(image_size=8, holdout_fraction=0, max_bad_fraction=0.5)
    manifest = ingest(ListSource(str(listing), timeout_s=1), str(tmp_path / "ds"), config)
    assert manifest["splits"]["train"]["skipped"] == [
        {"ref": f"{silent_server}/late.png", "reason": "unreadable: no answer within 1 s (source.timeout_s)"}]


# Real failures, each met where the code meets it: a write to a read-only and to a full
# disk, a training whose process fails, a server nobody answers for, a missing file.
# Each is raised where the CLI checks the source, as a failure of the command would be.


def _write_to(folder: Path, size: int):
    return lambda: write_bytes(str(folder / "probe.bin"), b"x" * size)


def _failing_training(root: Path):
    from ddp_jobs import empty_job
    from tasks.config import TrainingRuntime
    from tasks.machinery.process import train

    options = TrainingRuntime(device="cpu", cpu_threads=1)
    return lambda: train(empty_job, str(root), 2, options, title="empty", options=options)


@pytest.mark.slow  # a training process among the failures
def test_every_failure_is_one_line_and_debug_adds_the_traceback(monkeypatch, capsys, tmp_path):
    from disks import small_disk
    from local_servers import free_port
    from storage.fsutil import read_bytes
    from tasks.config import PipelineConfig

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    nobody = free_port()  # nothing listens there
    with small_disk(tmp_path / "read-only", "1m", "ro") as read_only, small_disk(tmp_path / "full", "1m") as full:
        failures = [
            (_write_to(read_only, 1), 1, f"vqvae2: ReadOnlyStorage: {read_only}/probe.bin: the storage is read-only "
                                         "(Read-only file system); choose a writable storage root; what to do: fix "
                                         "the cause named above"),
            (_write_to(full, 2 * 2**20), 1, f"vqvae2: StorageFull: {full}/probe.bin: no space left on the storage"),
            (_failing_training(tmp_path / "training"), 1, "vqvae2: TrainingFailed: empty: ValueError in the training "
                                                          "process"),
            (lambda: read_bytes(f"http://127.0.0.1:{nobody}/list.csv"), 1, "vqvae2: ClientConnectorError: Cannot "
                                                                        f"connect to host 127.0.0.1:{nobody} "),
            (lambda: read_bytes(str(tmp_path / "weights.pt")), 2, f"vqvae2: {tmp_path / 'weights.pt'}: not found"),
        ]
        printed = []
        for failure, code, line in failures:
            monkeypatch.setattr(PipelineConfig, "check_source", lambda self, failure=failure: failure())
            argv = ["report", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source", str(tmp_path)]
            err = _refused(capsys, argv, code)
            printed.append(err)
            assert err.startswith(line), err
            with pytest.raises(SystemExit) as exit_info:
                main([*argv, "--debug"])
            debugged = capsys.readouterr().err
            assert exit_info.value.code == code and debugged.startswith("Traceback")
            assert debugged.splitlines()[-1] == err.rstrip("\n").removesuffix(" (--debug shows the traceback)")
    assert "ValueError: the training data yields no batches; what to do" in printed[2]  # the process's own why
    assert "check the storage and the network and run again: it resumes where it stopped" in printed[3]


@pytest.mark.slow
def test_a_failure_inside_a_prefect_run_is_one_line_without_its_traceback(prefect_api, tmp_path):
    """The run's logs still name the failed task; only the traceback stays off the terminal.
    (On the session's Prefect API: a temporary server would start twice.)"""
    from prefect.settings import get_current_settings

    api = str(get_current_settings().api.url)
    labels = [i % 3 for i in range(24)]
    labels[5] = 9
    _labelled_tar(tmp_path / "00000.tar", labels[:12], 0)
    _labelled_tar(tmp_path / "00001.tar", labels[12:], 12)
    argv = ["stage", "ingest", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source",
            f"{tmp_path}/{{00000..00001}}.tar", "--set", "ingest.holdout_fraction=0"]
    line = f"vqvae2: {tmp_path / 'root'}/datasets/"
    quiet, _ = installed(argv, tmp_path / "home", cwd=tmp_path, api=api)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    ours = [row for row in quiet.stderr.splitlines() if row.startswith("vqvae2: ")]
    assert len(ours) == 1 and ours[0].startswith(line) and "00000.tar#000005 (label 9)" in ours[0], quiet.stderr[-3000:]
    loud, _ = installed([*argv, "--debug"], tmp_path / "home", cwd=tmp_path, api=api)
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert [row for row in loud.stderr.splitlines() if row.startswith("vqvae2: ")] == ours


def test_the_cli_parses_without_importing_prefect_or_the_stages():
    """What keeps a refused option fast: the stage list is read only by the `stage` command."""
    code = ("import sys; from flows.cli import parser; parser().parse_args(['run', '--preset', 'smoke']); "
            "print(sorted(m for m in ('prefect', 'flows.pipeline') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


# --- a field named as the user wrote it --------------------------------------------------------


@pytest.mark.parametrize("setting, message", [
    ("train_autoencoder.lr=-1", "invalid configuration: train_autoencoder.lr must be > 0"),
    ("train_prior.steps=0", "invalid configuration: train_prior.steps must be >= 1"),
    ("train_classifier.micro_batch_size=999", "invalid configuration: train_classifier.micro_batch_size must be "
                                              "between 1 and train_classifier.batch_size (32)"),
    ("priors.1.kernel_size=4", "invalid configuration: priors.1.kernel_size must be odd and >= 3"),
    ("autoencoder.beta=-1", "invalid configuration: autoencoder.beta must be >= 0"),
])
def test_a_model_setting_is_named_by_its_set_key_not_by_its_shared_type(setting, message, capsys):
    """The three trainings share one type, as the priors do: its checks name the type's prefix
    (`train.lr`), which names no `--set` key; the error names the one the user wrote."""
    err = _refused(capsys, ["report", "--preset", "smoke", "--set", "train_prior.lr=0.01", "--set", setting])
    assert err.startswith(f"vqvae2: {message}"), err
    assert " train.lr" not in err and " prior.kernel_size" not in err


@pytest.mark.parametrize("setting, field", [
    (f"storage.storage_options.secret={SECRET}", "storage.storage_options holds 'secret'"),
    (f"storage.storage_options.aws_secret_access_key={SECRET}",
     "storage.storage_options holds 'aws_secret_access_key'"),
    (f"storage.storage_options.client_kwargs.aws_session_token={SECRET}",
     "storage.storage_options.client_kwargs holds 'aws_session_token'"),
    (f"source.storage_options.password={SECRET}", "source.storage_options holds 'password'"),
])
def test_a_secret_set_as_a_storage_option_is_refused_naming_the_field_and_where_credentials_go(setting, field,
                                                                                               capsys):
    err = _refused(capsys, ["report", "--preset", "smoke", "--source", "s3://bucket/images", "--set", setting])
    assert err.startswith(f"vqvae2: invalid configuration: {field}, a credential: "), err
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err and "AWS_PROFILE" in err and "Prefect Secret block" in err
    assert SECRET not in err and "Extra inputs are not permitted" not in err


def test_a_storage_option_set_by_its_dotted_key_is_taken(tmp_path):
    from flows.cli import parser
    from flows.command_config import build_config

    args = parser().parse_args(["ls", "--root", str(tmp_path), "--set", "storage.storage_options.anon=true",
                                "--set", "storage.storage_options.client_kwargs.region_name=eu-west-1"])
    options = build_config(args).storage.storage_options
    assert options == {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}
