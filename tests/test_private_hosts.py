"""A list may not make the worker fetch from inside its network (issue 33, point 8): cloud
metadata and link-local hosts from any list; loopback, private and other non-public hosts
from a remote list (its own host excepted); unless `source.allow_private`. Refused where the
list is read (before the run, and at ingest), and again where an image is fetched (a
redirect, a DNS answer changed since). Real local HTTP servers on 127.0.0.1; nothing reaches
169.254.169.254: the refusals come before any fetch, and the tests check that they do."""
from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import threading
from pathlib import Path

import pytest

from flows.cli import main
from storage.ingest import IngestConfig, ingest
from storage.sources import FileItem, ListSource
from storage.sources.hosts import CLOUD, PRIVATE, RefusedHost, address_reason, host_reason
from image_files import csv_list, png_file

METADATA_ROW = "http://169.254.169.254/latest/meta-data/x.png"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `/redirect` answers 302 to the cloud metadata address; every path asked is kept."""

    def do_GET(self) -> None:
        self.server.asked.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            # Port 9: should the guard ever fail, nothing serves metadata there.
            self.send_header("Location", "http://169.254.169.254:9/latest/meta-data/x.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _serving(folder: Path):
    """A local HTTP server on 127.0.0.1 serving `folder`; yields (its base URL, the paths it was asked for)."""
    folder.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    server.asked = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_fetch(monkeypatch):
    """Any image fetch fails the test: a refusal must come before one."""

    def fetch(*args, **kwargs):
        raise AssertionError("an image was fetched")

    monkeypatch.setattr("storage.sources.list_file.fetch", fetch)


def _refused_by_cli(capsys, url: str, root: Path) -> str:
    """`vqvae2 run --source url` in-process: exit code 2, one line, nothing under the root; that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "smoke", "--root", str(root), "--source", url])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not root.exists()  # before anything ran
    return err


def _refusal(source: ListSource) -> list[str]:
    """The messages of the pre-check and of the ingest's partition, which must both refuse `source`."""
    messages = []
    for call in (source.check, lambda: source.partition(IngestConfig())):
        with pytest.raises(RefusedHost) as caught:
            call()
        assert isinstance(caught.value, ValueError)  # bad input: the CLI exits 2
        messages.append(str(caught.value))
    return messages


# --- where the list is read ------------------------------------------------------------------


def test_a_remote_list_naming_the_metadata_address_is_refused_before_any_fetch(tmp_path, capsys, no_fetch):
    served = tmp_path / "web"
    png_file(served / "lists" / "img" / "a.png")
    rows = ["img/a.png"] + [METADATA_ROW] * 3 + [f"http://169.254.169.254/latest/meta-data/{i}.png" for i in range(5)]
    csv_list(served / "lists" / "list.csv", rows)
    with _serving(served) as (base, asked):
        url = f"{base}/lists/list.csv"
        messages = _refusal(ListSource(url))
        err = _refused_by_cli(capsys, url, tmp_path / "root")
    assert set(asked) == {"/lists/list.csv"}  # the list, read by each check; never an image
    first = f"{url}: row 2 (line 3) ({METADATA_ROW}, 169.254.169.254: the cloud metadata address), row 3 (line 4)"
    for message in messages:
        assert message.startswith(first) and "and 3 more name hosts inside the worker's network" in message
        assert message.endswith("If you trust the list, set source.allow_private=true (ListSource.allow_private) "
                                "to fetch them")
    assert err.startswith(f"vqvae2: {first}") and "--set source.allow_private=true (ListSource" in err


def test_a_local_list_naming_the_metadata_address_is_refused_unless_allowed(tmp_path, no_fetch):
    data = tmp_path / "data"
    png_file(data / "img" / "a.png")
    decimal = "http://2852039166/x.png"  # 169.254.169.254 written as one number: resolved, not parsed
    listing = csv_list(data / "list.csv", ["img/a.png", "http://127.0.0.1:9/lan.png", "http://10.0.0.7/lan.png",
                                        METADATA_ROW, decimal, "http://[fd00:ec2::254]/x.png",
                                        "http://169.254.170.2/v2/credentials/x.png"])
    for message in _refusal(ListSource(str(listing))):
        assert message.startswith(f"{listing}: row 4 (line 5) ({METADATA_ROW}, 169.254.169.254: the cloud metadata "
                                  f"address), row 5 (line 6) ({decimal}, 2852039166 (169.254.169.254): the cloud "
                                  "metadata address), row 6 (line 7) (http://[fd00:ec2::254]/x.png, fd00:ec2::254: "
                                  "the cloud metadata address), row 7 (line 8) (http://169.254.170.2/v2/credentials/"
                                  "x.png, 169.254.170.2: link-local, where clouds serve instance metadata")
        assert "row 2 " not in message and "row 3 " not in message  # a user's own LAN, from his own list: fine
        assert "a list may name no cloud metadata or link-local host" in message
    ListSource(str(listing), allow_private=True).check()
    ListSource(str(csv_list(data / "lan.csv", ["img/a.png", "http://127.0.0.1:9/lan.png"]))).check()


def test_a_remote_list_naming_a_loopback_host_is_refused_and_ingested_when_allowed(tmp_path, capsys):
    images, lists = tmp_path / "images", tmp_path / "lists"
    with _serving(images) as (image_base, image_asked), _serving(lists) as (list_base, _):
        rows = [f"{image_base}/img{i}.png" for i in range(4)]
        for i in range(4):
            png_file(images / f"img{i}.png", i)
        csv_list(lists / "list.csv", rows)
        url = f"{list_base}/list.csv"
        messages = _refusal(ListSource(url))
        err = _refused_by_cli(capsys, url, tmp_path / "root")
        assert image_asked == []  # refused before any image was fetched
        allowed = ListSource(url, allow_private=True)
        manifest = ingest(allowed, str(tmp_path / "ds"), IngestConfig(image_size=8, holdout_fraction=0))
    host = image_base.removeprefix("http://").split(":")[0]
    for message in messages + [err]:
        assert f"{url}: row 1 (line 2) ({rows[0]}, {host}: loopback), row 2 (line 3)" in message
        assert "a remote list may name public hosts and its own host" in message
    assert "--set source.allow_private=true" in err
    assert manifest["num_samples"] == 4 and sorted(image_asked) == [f"/img{i}.png" for i in range(4)]


def test_a_host_name_that_resolves_to_loopback_is_caught(tmp_path, no_fetch):
    with _serving(tmp_path / "lists") as (base, _):
        csv_list(tmp_path / "lists" / "list.csv", ["http://localhost:9/a.png", "http://127.1/b.png"])
        message = _refusal(ListSource(f"{base}/list.csv"))[0]
    assert "row 1 (line 2) (http://localhost:9/a.png, localhost (" in message and "): loopback)" in message
    assert "row 2 (line 3) (http://127.1/b.png, 127.1 (127.0.0.1): loopback)" in message  # short for 127.0.0.1


def test_a_remote_list_may_name_its_own_host(tmp_path):
    served = tmp_path / "web"
    png_file(served / "b.png")
    with _serving(served) as (base, asked):
        csv_list(served / "lists" / "list.csv", [f"{base}/b.png"])
        source = ListSource(f"{base}/lists/list.csv")
        source.check()  # its relative rows reach that host anyway
        manifest = ingest(source, str(tmp_path / "ds"), IngestConfig(image_size=8, holdout_fraction=0))
        csv_list(served / "lists" / "metadata.csv", [f"{base}/b.png", METADATA_ROW])
        with pytest.raises(RefusedHost, match="row 2 .*the cloud metadata address"):
            ListSource(f"{base}/lists/metadata.csv").check()
    assert manifest["num_samples"] == 1 and "/b.png" in asked


# --- where an image is fetched ----------------------------------------------------------------


def _read(source: ListSource, refs: list[str]) -> dict[str, tuple[bytes | None, str | None]]:
    """What the reader makes of `refs`, as a unit of a plan (no check of the list): {ref: (data, reason)}."""
    with source.open() as reader:
        return {item.ref: (item.data, item.error)
                for item in reader.read("train", [FileItem(ref, 0, "") for ref in refs])}


def test_a_redirect_to_the_metadata_address_is_refused_on_fetching(tmp_path):
    listing = csv_list(tmp_path / "list.csv", ["x"])  # a local list: its rows may name the LAN, not metadata
    with _serving(tmp_path / "web") as (base, asked):
        png_file(tmp_path / "web" / "a.png")
        read = _read(ListSource(str(listing), timeout_s=2), [f"{base}/a.png", f"{base}/redirect"])
    assert read[f"{base}/a.png"][0] == (tmp_path / "web" / "a.png").read_bytes()
    data, reason = read[f"{base}/redirect"]
    assert data is None and reason.startswith("unreadable: RefusedHost: http://169.254.169.254:9/latest/meta-data/"
                                              "x.png: 169.254.169.254: the cloud metadata address, not fetched")
    assert sorted(asked) == ["/a.png", "/redirect"]


def test_a_private_host_that_got_past_the_check_is_refused_on_fetching(tmp_path):
    """A name whose DNS answer changed since the list was read (rebinding): the fetch's own resolver refuses it."""
    png_file(tmp_path / "web" / "a.png")
    with _serving(tmp_path / "web") as (base, asked):
        port = base.rsplit(":", 1)[1]
        rows = [f"http://localhost:{port}/a.png", f"{base}/a.png"]
        refused = _read(ListSource("https://lists.example.com/list.csv", timeout_s=2), rows)
        assert asked == []
        allowed = _read(ListSource("https://lists.example.com/list.csv", timeout_s=2, allow_private=True), rows)
    assert refused[rows[0]][0] is None and "RefusedHost: localhost (" in refused[rows[0]][1]
    assert refused[rows[1]][1].startswith(f"unreadable: RefusedHost: {rows[1]}: 127.0.0.1: loopback, not fetched")
    assert all(data == (tmp_path / "web" / "a.png").read_bytes() for data, _ in allowed.values())


# --- the rule, address by address --------------------------------------------------------------


@pytest.mark.parametrize("address, remote, local", [
    ("169.254.169.254", "the cloud metadata address", "the cloud metadata address"),
    ("fd00:ec2::254", "the cloud metadata address", "the cloud metadata address"),
    ("::ffff:169.254.169.254", "the cloud metadata address", "the cloud metadata address"),
    ("169.254.170.2", "link-local, where clouds serve instance metadata and credentials",
     "link-local, where clouds serve instance metadata and credentials"),
    ("fe80::1", "link-local, where clouds serve instance metadata and credentials",
     "link-local, where clouds serve instance metadata and credentials"),
    ("127.0.0.1", "loopback", None),
    ("::1", "loopback", None),
    ("::ffff:127.0.0.1", "loopback", None),
    ("0.0.0.0", "unspecified", None),
    ("::", "unspecified", None),
    ("0.1.2.3", "private", None),
    ("10.1.2.3", "private", None),
    ("172.16.0.1", "private", None),
    ("192.168.1.1", "private", None),
    ("fc00::1", "private", None),
    ("100.64.0.1", "not public", None),  # carrier-grade NAT
    ("224.0.0.1", "multicast", None),
    ("8.8.8.8", None, None),
    ("2606:4700::1", None, None),
])
def test_which_addresses_a_row_may_not_reach(address, remote, local):
    assert address_reason(ipaddress.ip_address(address), PRIVATE) == remote
    assert address_reason(ipaddress.ip_address(address), CLOUD) == local


def test_a_host_that_does_not_resolve_is_left_to_the_fetch():
    assert host_reason("no-such-host.invalid", PRIVATE) is None  # its fetch fails, or the guard judges it then


# --- the setting ---------------------------------------------------------------------------------


def test_allow_private_reaches_a_list_source_only_and_no_key():
    from tasks.config import config_key, pipeline_config
    from tasks.machinery.failures import first_line
    from tasks.stages import stage_keys

    allowed = pipeline_config("smoke", source={"url": "/data/list.csv", "allow_private": True})
    plain = pipeline_config("smoke", source={"url": "/data/list.csv"})
    assert allowed.build_source().allow_private is True and plain.build_source().allow_private is False
    digest = "sha256:" + "0" * 64
    assert stage_keys(allowed, digest) == stage_keys(plain, digest) and config_key(allowed) == config_key(plain)
    with pytest.raises(ValueError, match="source.allow_private applies to a list source, not to kind 'image-folder'"):
        pipeline_config("smoke", source={"url": "/data/images", "allow_private": True})
    error = RefusedHost("l.csv: row 1 (...) name hosts inside the worker's network. If you trust the list, set "
                        "source.allow_private=true (ListSource.allow_private) to fetch them")
    assert 'set {"source": {"allow_private": true}} (ListSource' in first_line(error, form="parameters")
