"""URLs and filesystems: the one place that knows how bytes reach a local disk, memory:// or S3.

Every function takes an fsspec URL (a local path, ``file://``, ``memory://``,
``s3://bucket/prefix``) plus optional ``storage_options`` handed to
``fsspec.core.url_to_fs`` untouched. S3 endpoints and credentials come from the
standard ``AWS_*`` variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ...) or
from ``storage_options`` (``endpoint_url``, ``key``, ``secret``).

Errors name the URL (with any ``user:password@`` part removed) and never a secret:
a missing file or bucket raises ``FileNotFoundError``, refused credentials raise
``PermissionError``.

Writes are atomic, so a reader never sees half a file. On an object store (S3) an
object appears only when its upload completes: :func:`atomic_open` writes the final
name and abandons the upload if the block fails. Elsewhere it writes a sibling
``<name>.tmp-<host>-<pid>-<random>`` and renames it once complete; a killed writer
leaves that sibling behind, and :func:`sweep_temporaries` removes the ones whose
writer is gone.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

StorageOptions = Mapping[str, Any] | None

TMP_MARKER = ".tmp-"
# A URL's user:password@ part, anywhere in a text (URLs inside messages too). The second form
# is a password holding an unescaped "/" (AWS secret keys often do): a ":" that no port follows.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s]*@|[^/@\s:]*:(?!\d{1,5}(?:[/\s]|$))\S*@)")
# The same without a scheme (`AKID:SECRET@bucket/runs`): a word starting a token (not inside a
# path) that holds a ":" and an "@", the ":" not the start of "://".
_BARE_USERINFO = re.compile(r"(?<![^\s'\"(\[{<,;=])[^\s/@:'\"(\[{<,;=]+:(?!/)[^\s'\"]*@(?=[^\s/@'\"])")
_GLOB_CHARS = re.compile(r"[*?\[]")


def redact(url: str) -> str:
    """The URL (or a message naming URLs) without any ``user:password@`` part, with or
    without a scheme (``s3://AKID:SECRET@bucket``, ``AKID:SECRET@bucket``), fit for messages
    and manifests."""
    return _BARE_USERINFO.sub("", _USERINFO.sub(r"\1", str(url)))


def holds_userinfo(url: str) -> bool:
    """Whether ``url`` names a user or password (``user@``, ``user:password@``): what
    :func:`redact` would remove."""
    return redact(url) != str(url)


def join(url: str, *parts: str) -> str:
    """``url/part/part``; URLs stay strings so they travel unchanged to fsspec."""
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str, storage_options: StorageOptions = None):
    """``(fs, path)`` for a URL; a URL fsspec cannot serve fails naming it."""
    try:
        return fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise ValueError(f"{redact(url)}: no filesystem serves this URL ({err})") from err


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Re-raise a missing path or refused credentials with a message naming ``url``.

    The original error is chained for debugging; s3fs/botocore messages carry error
    codes and request ids, never credentials.
    """
    try:
        with _no_room_errors(url):
            yield
    except FileNotFoundError as err:
        what = "missing file or folder" if _is_local(url) else "missing file, folder or bucket"
        raise FileNotFoundError(f"{redact(url)}: not found ({what}): {err}") from err
    except ReadOnlyStorage:
        raise
    except PermissionError as err:
        hint = ("check the permissions of the path and its folders for the user this process runs as"
                if _is_local(url) else
                "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options key / secret)")
        raise PermissionError(f"{redact(url)}: access denied ({err}); {hint}") from err


class StorageFull(OSError):
    """No space left (or over quota) where an artifact is written: a retry cannot cure it."""


class ReadOnlyStorage(PermissionError):
    """The storage refuses every write, whoever asks."""


@contextlib.contextmanager
def _no_room_errors(url: str) -> Iterator[None]:
    """A full or read-only storage, named: the errors of writing, wherever they arise."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"{redact(url)}: no space left on the storage ({err.strerror}); free space there "
                              "or choose another storage root") from err
        if err.errno == errno.EROFS:
            raise ReadOnlyStorage(f"{redact(url)}: the storage is read-only ({err.strerror}); choose a writable "
                                  "storage root") from err
        raise


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _make_parent_dirs(fs, path: str) -> None:
    # Only a disk has folders. On an object store s3fs.makedirs would *create a missing
    # bucket*, turning a typo in a URL into a stray bucket instead of a clear error.
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)


@contextlib.contextmanager
def atomic_open(url: str, storage_options: StorageOptions = None) -> Iterator[Any]:
    """A binary file to write that appears at ``url`` only if the block completes."""
    fs, path = filesystem(url, storage_options)
    if _uploads_on_close(fs):
        with _upload(fs, path, url) as handle:
            yield handle
        return
    tmp = f"{path}{TMP_MARKER}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    with storage_errors(url):
        _make_parent_dirs(fs, path)
        handle = fs.open(tmp, "wb")
    try:
        try:
            with _no_room_errors(url):
                yield handle
        finally:
            with storage_errors(url):
                handle.close()
        with storage_errors(url):
            fs.mv(tmp, path)
    except BaseException:
        # Best effort: the temporary may never have been created; the first error is the news.
        with contextlib.suppress(OSError):
            fs.rm(tmp)
        raise


# Who writes a temporary: a sweeper on the same host can tell whether that process lives.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs"}
_TEMPORARY = re.compile(re.escape(TMP_MARKER) + r"(?:([0-9a-f]{8})-(\d+)-)?[0-9a-f]{12}$")


def _uploads_on_close(fs) -> bool:
    """Whether the filesystem's files are uploads that publish nothing until closed and can
    be abandoned (s3fs, gcsfs): there, writing the final name is already atomic, and a
    killed writer leaves no object, where it would leave a temporary behind."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & _OBJECT_STORES)


@contextlib.contextmanager
def _upload(fs, path: str, url: str) -> Iterator[Any]:
    with storage_errors(url):
        handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        handle.discard()  # aborts a multipart upload; nothing was published
        handle.closed = True
        raise
    with storage_errors(url):
        handle.close()  # the upload happens here, all or nothing


def sweep_temporaries(url: str, storage_options: StorageOptions = None, *, min_age_s: float = 3600.0) -> list[str]:
    """Remove the temporaries of killed writers under the folder ``url``; returns the URLs removed.

    A temporary written on this host is removed once its process is gone; one from
    another host (a shared disk) or of unknown origin once untouched for ``min_age_s``.
    Object stores have none (see :func:`atomic_open`): nothing is listed there.
    """
    fs, path = filesystem(url, storage_options)
    if _uploads_on_close(fs) or not exists(url, storage_options):
        return []
    removed, now = [], time.time()
    for rel, info in find(url, storage_options).items():
        match = _TEMPORARY.search(rel)
        if match is None:
            continue
        host, pid = match.group(1), match.group(2)
        if host == HOST and pid is not None:
            stale = not process_alive(int(pid))
        else:
            stale = now - (modified_time(info) or now) >= min_age_s
        if stale:
            with contextlib.suppress(FileNotFoundError):  # another sweeper was quicker
                remove(join(url, rel), storage_options)
            removed.append(redact(join(url, rel)))
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host lives."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write ``data`` to ``url`` atomically."""
    with atomic_open(url, storage_options) as f:
        f.write(data)


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    """The whole content of ``url``."""
    fs, path = filesystem(url, storage_options)
    with storage_errors(url):
        return fs.cat_file(path)


def write_json(url: str, obj: Any, storage_options: StorageOptions = None) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(url, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: StorageOptions = None) -> Any:
    """Parse the JSON file at ``url``."""
    data = read_bytes(url, storage_options)
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValueError(f"{redact(url)}: not valid JSON ({err})") from err


def exists(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether ``url`` exists now (listing caches are dropped: other processes write too)."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(fs._parent(path))
    with storage_errors(url):
        return fs.exists(path)


def find(url: str, storage_options: StorageOptions = None) -> dict[str, dict]:
    """Every file under ``url`` as ``{path relative to url: fsspec info}``; fails if ``url`` is missing."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    with storage_errors(url):
        found = fs.find(path, detail=True) if fs.isdir(path) else None
    if found is None:
        raise FileNotFoundError(f"{redact(url)}: not found (no such folder)")
    root = path.rstrip("/") + "/"
    return {name[len(root):]: info for name, info in found.items() if name.startswith(root)}


def remove(url: str, storage_options: StorageOptions = None) -> None:
    """Delete a file or a whole folder."""
    fs, path = filesystem(url, storage_options)
    with storage_errors(url):
        fs.rm(path, recursive=True)


def expand_urls(patterns: str | Sequence[str], storage_options: StorageOptions = None) -> list[str]:
    """Expand brace patterns (``shard-{000..009}.tar``) and globs (``*.tar``) into sorted URLs.

    A brace-expanded name must exist; a glob must match at least one file.
    """
    expanded = [u for p in ([patterns] if isinstance(patterns, str) else patterns) for u in braceexpand.braceexpand(p)]
    urls: list[str] = []
    for url in expanded:
        fs, path = filesystem(url, storage_options)
        with storage_errors(url):
            if _GLOB_CHARS.search(path):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise FileNotFoundError(f"{redact(url)}: the pattern matches no file")
                urls.extend(fs.unstrip_protocol(m) if "://" in url else m for m in matches)
            else:
                fs.info(path)  # fail fast on a missing shard
                urls.append(url)
    return urls


def modified_time(info: Mapping[str, Any]) -> float | None:
    """Seconds since the epoch at which a file changed, from any backend's info dict."""
    for field in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def fingerprint(info: Mapping[str, Any]) -> str:
    """Size plus the backend's content tag (S3 ETag) or modification time: cheap change detection."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5") or modified_time(info)
    return f"{info.get('size')}:{tag}"


def sha256_file(url: str, storage_options: StorageOptions = None, block_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    return _hash_file(url, hashlib.sha256(), storage_options, block_size)


def md5_file(url: str, storage_options: StorageOptions = None, block_size: int = 1 << 22) -> str:
    """Hex MD5 of a file's bytes (for mirrors that publish MD5 checksums)."""
    return _hash_file(url, hashlib.md5(), storage_options, block_size)


def _hash_file(url: str, digest, storage_options: StorageOptions, block_size: int) -> str:
    fs, path = filesystem(url, storage_options)
    # The bytes as they are now: s3fs would read a file rewritten since it was listed (zarr's
    # metadata, say) as of its listed ETag, and fail.
    fs.invalidate_cache(path)
    with storage_errors(url), fs.open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


# Filesystems without an atomic exclusive create (memory://) are made exclusive within this process.
_CREATING = threading.Lock()


def create_new(url: str, data: bytes, storage_options: StorageOptions = None) -> bool:
    """Write ``data`` to ``url`` unless a file is there already: True if this call wrote it,
    False if ``url`` existed. Of several writers at once exactly one gets True, and a reader
    sees the whole ``data`` or nothing. S3 writes with ``If-None-Match: *`` (a conditional
    write); a disk links a complete temporary to the name (``link`` never replaces a file,
    also over NFS); other filesystems (memory://) are exclusive within this process only.
    """
    fs, path = filesystem(url, storage_options)
    try:
        with storage_errors(url):
            if not isinstance(fs, LocalFileSystem):
                with contextlib.nullcontext() if _uploads_on_close(fs) else _CREATING:
                    fs.pipe_file(path, data, mode="create")
                return True
            _make_parent_dirs(fs, path)
            tmp = f"{path}{TMP_MARKER}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            with open(tmp, "wb") as file:
                file.write(data)
            try:
                os.link(tmp, path)
            finally:
                os.remove(tmp)
    except FileExistsError:
        return False
    return True
