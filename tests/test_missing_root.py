"""The commands on finished runs (`ls`, `report`, `sample`, `reconstruct`, `verify`) given a
root that is not there: a path that does not exist, a bucket that does not exist (a real
S3 API: the moto server) or that cannot be read is refused in one line naming the root,
exit code 2; a root that is there but holds no recorded run says so and what to do, and
never falls back to the default config nobody gave."""
from __future__ import annotations

import pytest

from flows.cli import main


def _vqvae2(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `vqvae2 argv`."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


COMMANDS = {
    "ls": [],
    "report": [],
    "sample": ["--out", "{tmp}/s.png"],
    "reconstruct": ["--out", "{tmp}/r.png"],
    "verify": [],
}


def _argv(command: str, root: str, tmp_path) -> list[str]:
    return [command, "--root", root, *(flag.format(tmp=tmp_path) for flag in COMMANDS[command])]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_root_that_does_not_exist_is_refused_naming_it(command, tmp_path, capsys):
    root = str(tmp_path / "no" / "such")
    code, out, err = _vqvae2(capsys, *_argv(command, root, tmp_path))
    assert code == 2 and err.count("\n") == 1, (code, out, err)
    assert err.startswith(f"vqvae2: {root}: the storage root does not exist"), err
    assert "ingest" not in err and "fashion-mnist" not in err  # no advice for a config nobody gave
    assert not (tmp_path / "no").exists()  # looking made nothing


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bucket_that_does_not_exist_is_refused_naming_the_root_not_a_credential(command, s3_bucket, tmp_path,
                                                                                   capsys):
    root = f"{s3_bucket.url}-missing/runs"  # a bucket nobody created, on the same server
    code, out, err = _vqvae2(capsys, *_argv(command, root, tmp_path))
    assert code == 2 and err.count("\n") == 1, (code, out, err)
    assert err.startswith(f"vqvae2: {root}: the storage root does not exist"), err
    assert all(s3_bucket.env[name] not in out + err for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))


def test_a_root_that_cannot_be_read_is_refused_naming_it_redacted(monkeypatch, capsys):
    """Access denied (a bucket of another account): one line naming the root, without the
    user part of its URL."""
    import storage.fsutil

    monkeypatch.setattr(storage.fsutil, "filesystem", lambda url, storage_options=None: (_Denying(), str(url)))
    code, out, err = _vqvae2(capsys, "ls", "--root", "s3://bucket/runs")
    assert code == 2 and err.count("\n") == 1, (code, out, err)
    assert err.startswith("vqvae2: s3://bucket/runs: the storage root cannot be read (access denied)"), err


class _Denying:
    """A file system that refuses every request, as S3 does a bucket of another account."""

    def invalidate_cache(self, path=None) -> None:
        pass

    def _parent(self, path: str) -> str:
        return path.rsplit("/", 1)[0]

    def exists(self, path: str) -> bool:
        raise PermissionError("Forbidden")


def test_ls_of_a_root_without_runs_says_so_naming_the_root_and_what_to_do(tmp_path, capsys):
    code, out, err = _vqvae2(capsys, "ls", "--root", str(tmp_path))
    assert (code, err) == (0, "")
    assert out == f"no finished runs under {tmp_path}: `vqvae2 run --root {tmp_path}` makes one\n"


def test_ls_of_an_s3_root_without_runs_says_so(s3_bucket, capsys):
    code, out, err = _vqvae2(capsys, "ls", "--root", s3_bucket.url)
    assert (code, err) == (0, "") and out.startswith(f"no finished runs under {s3_bucket.url}: "), out


@pytest.mark.parametrize("command", ["report", "sample", "reconstruct"])
def test_a_root_without_a_recorded_run_says_so_instead_of_taking_the_default_config(command, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "datasets").mkdir(parents=True)  # a root that is there, with nothing finished
    code, out, err = _vqvae2(capsys, *_argv(command, str(root), tmp_path))
    assert code == 2 and err.count("\n") == 1, (code, out, err)
    assert err.startswith(f"vqvae2: no finished run is recorded under {root}: run `vqvae2 run --root {root}` "
                          "first"), err
    assert "ingest" not in err and "fashion-mnist" not in err


def test_with_a_preset_given_a_root_without_the_run_names_the_stage_to_run(tmp_path, capsys):
    """The user named the config: what is missing of it is said (the stage that makes it)."""
    code, out, err = _vqvae2(capsys, "report", "--preset", "smoke", "--root", str(tmp_path))
    assert code == 2 and "run the `ingest` stage" in err, err


def test_verify_of_a_root_with_nothing_finished_says_so(tmp_path, capsys):
    code, out, err = _vqvae2(capsys, "verify", "--root", str(tmp_path))
    assert (code, err) == (0, "")
    assert out == f"no finished artifacts under {tmp_path}: nothing to check\n"
