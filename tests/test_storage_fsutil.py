"""URLs and filesystems: atomic writes, pattern expansion, and errors that name the URL but no secret."""
from __future__ import annotations

import moto.settings
import pytest

from storage.fsutil import (
    atomic_open, exists, expand_urls, find, holds_userinfo, read_bytes, read_json, redact, write_bytes, write_json,
)
from storage.ingest import IngestConfig, ingest
from storage.sources import IdxSource


def test_redact_drops_userinfo():
    assert redact("s3://AKIA:secret@bucket/x") == "s3://bucket/x"
    assert redact("/plain/path") == "/plain/path"


@pytest.mark.parametrize("text, redacted", [
    ("AKID:SECRET@bucket/runs", "bucket/runs"),  # no scheme
    ("vqvae2: AKID:SECRET@bucket/runs: not found", "vqvae2: bucket/runs: not found"),
    ('Invalid bucket name "AKID:SECRET@bucket": Bucket name must match', 'Invalid bucket name "bucket": Bucket name must match'),
    ("--root=AKID:SECRET@bucket", "--root=bucket"),
    ("s3://AKID:wJalr/K7MDENG@bucket/x", "s3://bucket/x"),  # a secret key holding an unescaped "/"
    ("s3://AKID:p@ss@bucket/x", "s3://bucket/x"),  # and one holding an "@"
    ("https://TOKEN@github.com/x.png", "https://github.com/x.png"),  # a bare user part: often a token
    ("http://u:p@127.0.0.1:99/a.png and s3://k:s@b/c.png", "http://127.0.0.1:99/a.png and s3://b/c.png"),
])
def test_redact_drops_userinfo_in_every_spelling(text, redacted):
    assert redact(text) == redacted and holds_userinfo(text)


@pytest.mark.parametrize("text", [
    "/data/a:b@c.png", "s3://bucket/photos/me@home.png", "http://cdn:8080/img/logo@2x.png", "file:///tmp/a@b.png",
    "bob@example.com", "12:30 at noon", "s3://bucket/x", "memory://root/a@b",
])
def test_redact_leaves_urls_without_userinfo_alone(text):
    assert redact(text) == text and not holds_userinfo(text)


def test_atomic_write_appears_whole_or_not_at_all(storage_root):
    url, options = storage_root
    write_json(f"{url}/a/b.json", {"x": 1}, options)
    assert read_json(f"{url}/a/b.json", options) == {"x": 1}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(f"{url}/a/c.bin", options) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert not exists(f"{url}/a/c.bin", options)
    assert sorted(find(f"{url}/a", options)) == ["b.json"]  # no temporary left behind


def test_brace_and_glob_patterns_expand_to_existing_files(storage_root):
    url, options = storage_root
    for i in range(3):
        write_bytes(f"{url}/shards/part-{i:03d}.tar", b"x", options)
    braces = expand_urls(f"{url}/shards/part-{{000..002}}.tar", options)
    globbed = expand_urls([f"{url}/shards/*.tar"], options)
    assert [u.rsplit("/", 1)[-1] for u in braces] == [u.rsplit("/", 1)[-1] for u in globbed] == [
        "part-000.tar", "part-001.tar", "part-002.tar",
    ]  # fmt: skip
    assert read_bytes(globbed[0], options) == b"x"
    with pytest.raises(FileNotFoundError, match=r"part-003.tar: not found"):
        expand_urls(f"{url}/shards/part-{{000..003}}.tar", options)
    with pytest.raises(FileNotFoundError, match=r"\*.zip: the pattern matches no file"):
        expand_urls(f"{url}/shards/*.zip", options)


def test_missing_bucket_fails_fast_naming_the_url_not_the_secret(s3_bucket):
    url = "s3://no-such-bucket-vqvae2/datasets/x"
    with pytest.raises(FileNotFoundError) as caught:
        ingest(IdxSource(), url, IngestConfig(max_samples_per_split=10), storage_options=s3_bucket.storage_options)
    message = str(caught.value)
    assert message.startswith("s3://no-such-bucket-vqvae2/datasets/x/") and "bucket" in message
    assert s3_bucket.storage_options["secret"] not in message
    assert not exists("s3://no-such-bucket-vqvae2/", s3_bucket.storage_options)  # and no bucket was created


def test_refused_credentials_fail_naming_the_url_not_the_secret(s3_bucket, monkeypatch):
    write_bytes(f"{s3_bucket.url}/a.txt", b"x", s3_bucket.storage_options)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks keys, like AWS
    with pytest.raises(PermissionError) as caught:
        read_bytes(f"{s3_bucket.url}/a.txt", s3_bucket.storage_options)
    message = str(caught.value)
    assert message.startswith(f"{s3_bucket.url}/a.txt: access denied") and "AWS_ACCESS_KEY_ID" in message
    assert s3_bucket.storage_options["secret"] not in message
