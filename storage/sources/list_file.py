"""A list of images as a source: one row per image in a CSV, TSV, JSON Lines or Parquet file.

Paths in the list are relative to the list's folder, or absolute (a local path, or a URL
such as ``file://``, ``s3://``, ``https://``) and taken as they are. The list's
``storage_options`` reach the files whose URL has the list's protocol (or is relative);
other URLs are opened without options.

A list is data, perhaps someone else's: its rows must not pull any file the worker can
read into a dataset. So a row lies inside the list's folder (a relative path that does not
climb out of it with ``..``, or an absolute path or URL below it) or is an http(s) URL (on
a host allowed below); anything else (``/etc/...``, ``file://``, ``../``, another bucket,
and any local file in a list that is itself remote) fails the list, naming the rows, unless
``allow_outside``. A row with a user name or password (``s3://AKID:SECRET@bucket/x.png``)
always fails it, naming the row but not the value.

Nor may a list make the worker fetch from inside its network: an http(s) row whose host
resolves to a cloud metadata or link-local address fails any list, and one on a loopback,
private or other non-public address fails a list that is itself remote (its own host
excepted), unless ``allow_private`` (:mod:`storage.sources.hosts` states the rule, and keeps
it again when the images are fetched).

A list names files, it does not fingerprint them: :meth:`ListSource.digest` hashes the
list's bytes, so an edited list is noticed, but an image replaced behind an unchanged
line is not (write a new list, e.g. with a content hash column, to re-ingest it).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ..fsutil import filesystem, holds_userinfo, join, read_bytes, redact, sha256_file
from .base import (
    FileItem, Partition, Reader, SourceItem, answering, content_digest, grow_units, http_options, is_http, unit_interval,
)  # fmt: skip
from .hosts import CLOUD, PRIVATE, RefusedHost, guarded, origin, refused_hosts, url_host
from .image_folder import FETCH_BATCH, fetch, unreadable

PATH_COLUMNS = ("path", "url", "file", "filename", "image", "filepath")  # tried in order when path_column is None
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
SPLITS = ("train", "test")
AUTO = "auto"
AUTO_LABEL_COLUMN = "label"  # what label_column "auto" takes when the list has it
_INTEGER = re.compile(r"-?\d+")

Row = tuple[str, Mapping[str, Any]]  # (where in the file, e.g. "row 3 (line 4)"; the row's values by column)


@dataclass(frozen=True)
class ListSource:
    """Images named by a list file (kind ``"list"``).

    ``path_column``: the column holding each image's path (None: the first of
    :data:`PATH_COLUMNS` present). ``label_column``: None for unlabelled images (class
    names ``()``, label 0); ``"auto"``: the column ``label`` if the list has one, else None; each row's class, a name in ``class_names`` or an index
    into it; without ``class_names``, the sorted distinct values (numbers in numeric
    order) are the classes. Rows without a path, with a missing or unknown label, or
    repeating a path are ignored and named in the manifest. ``split_column``: ``train``
    or ``test`` per row; without it, a stable hash of each path (and the config's seed)
    holds out ``holdout_fraction`` as ``test``. Units are :class:`FileItem` tuples with
    an empty fingerprint (see the module's note).

    ``allow_outside``: also read rows outside the list's folder (see the module's note);
    it decides whether a list is refused, never what an accepted one becomes, so it is not
    part of :meth:`describe`. ``timeout_s``: how long an http(s) server (of the list or of
    a row) may take to answer (:func:`storage.sources.base.http_options`); None: aiohttp's 300 s.
    ``allow_private``: also fetch rows on hosts inside the network (see the module's note);
    like ``allow_outside``, it decides whether a list is refused, not what it becomes.
    """

    url: str
    path_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    class_names: tuple[str, ...] | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    allow_outside: bool = field(default=False, compare=False)
    allow_private: bool = field(default=False, compare=False)
    timeout_s: float | None = field(default=30.0, compare=False)
    kind: ClassVar[str] = "list"

    def __post_init__(self) -> None:
        list_format(self.url)  # fail at construction on an unsupported extension
        if self.class_names is not None:
            names = tuple(self.class_names)
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) < len(names):
                raise ValueError(f"ListSource.class_names must be distinct non-empty strings, got {self.class_names!r}")
            object.__setattr__(self, "class_names", names)  # a list from a config becomes hashable
            if self.label_column is None:
                raise ValueError("ListSource.class_names needs ListSource.label_column (the column holding the labels)")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "url": redact(self.url), "path_column": self.path_column,
            "label_column": self.label_column, "split_column": self.split_column, "class_names": self.class_names,
        }  # fmt: skip

    def options(self, url: str) -> Mapping[str, Any] | None:
        """The fsspec options for reading ``url``, the list or a row: the list's own for its
        protocol, none for others, and the timeout for http(s)."""
        options = self.storage_options if _protocol(url) == _protocol(self.url) else None
        return http_options(url, options, self.timeout_s)

    def row_options(self, ref: str, url: str) -> Mapping[str, Any] | None:
        """:meth:`options` for fetching a row (``ref`` as written, ``url`` resolved), guarded against
        the hosts the row may not reach: a redirect, or a DNS answer changed since the list was read."""
        guard = None if self.allow_private or not is_http(url) else self._host_scope(ref)
        return guarded(self.options(url), guard)

    def digest(self) -> str:
        # The place stays in: two folders may hold equal lists of relative paths to different images.
        with answering(self.url, self.timeout_s):
            sha256 = sha256_file(self.url, self.options(self.url))
        return content_digest({**self.describe(), "sha256": sha256})

    def check(self) -> None:
        """Read the list and check its columns and rows: what :meth:`partition` refuses, refused now."""
        self._read()

    def partition(self, config: Any, base: Mapping[str, Sequence[Any]] | None = None) -> Partition:
        source, rows, path_column = self._read()
        return source._partition(rows, path_column, config, base)

    def _read(self) -> tuple[ListSource, list[Row], str]:
        """``(this source with label_column "auto" resolved, the rows, the path column)``, the
        rows checked (:meth:`_refuse_unsafe_rows`)."""
        with answering(self.url, self.timeout_s):
            columns, rows = read_rows(self.url, self.options(self.url))
        source = self
        if self.label_column == AUTO:
            source = dataclasses.replace(self, label_column=AUTO_LABEL_COLUMN if AUTO_LABEL_COLUMN in columns else None)
        path_column = source._column(columns)
        source._refuse_unsafe_rows(rows, path_column)
        return source, rows, path_column

    def _refuse_unsafe_rows(self, rows: Sequence[Row], path_column: str) -> None:
        """Fail on rows holding credentials, on rows outside the list's folder unless allowed, and
        on rows naming hosts inside the network unless allowed."""
        paths = [(where, _path_text(row.get(path_column))) for where, row in rows]
        secret = [where for where, path in paths if holds_userinfo(path)]
        if secret:
            raise ValueError(
                f"{redact(self.url)}: {_some(secret)} hold a user name or password in the path (the userinfo "
                "before '@' in the URL, not repeated here), which would end up in manifests, logs and Prefect's UI: "
                "take it out of the list; the worker's AWS_* variables or instance role, or a Prefect Secret block "
                "named in source.credentials_block, give the credentials of the list's own storage"
            )
        if not self.allow_outside:
            self._refuse_outside(paths)
        if not self.allow_private:
            self._refuse_private(paths)

    def _refuse_outside(self, paths: Sequence[tuple[str, str]]) -> None:
        outside = [f"{where} ({redact(path)})" for where, path in paths if path and not self._inside(path)]
        if outside:
            local = "" if _is_local(self.url) else ", and never a local file, the list being remote"
            raise ValueError(
                f"{redact(self.url)}: {_some(outside)} lie outside the list's folder {redact(_folder(self.url))}: "
                f"a list may name files in its folder and below, and http(s) URLs{local}. Move the "
                "files beside the list, or set source.allow_outside=true (ListSource.allow_outside) to read them"
            )

    def _refuse_private(self, paths: Sequence[tuple[str, str]]) -> None:
        """Fail on http(s) rows whose host resolves to an address they may not reach (each host resolved once)."""
        rows = [(where, path, (url_host(path), self._host_scope(path))) for where, path in paths if is_http(path)]
        refused = refused_hosts(judged for _, _, judged in rows if judged[0])  # (host, scope) pairs
        named = [f"{where} ({redact(path)}, {refused[judged]})" for where, path, judged in rows if judged in refused]
        if named:
            rule = ("a list may name no cloud metadata or link-local host" if _is_local(self.url) else
                    "a remote list may name public hosts and its own host, never a cloud metadata or link-local one")
            raise RefusedHost(
                f"{redact(self.url)}: {_some(named)} name hosts inside the worker's network, which a list (maybe "
                f"someone else's) must not make it fetch: {rule}. If you trust the list, set "
                "source.allow_private=true (ListSource.allow_private) to fetch them"
            )

    def _host_scope(self, path: str) -> str:
        """What a row may not reach: every non-public address from a remote list, but for the list's
        own host (its relative rows reach it anyway); from a local list, metadata and link-local only."""
        if _is_local(self.url) or not is_http(path) or origin(path) == origin(self.url):
            return CLOUD
        return PRIVATE

    def _inside(self, path: str) -> bool:
        """Whether a row's path is an http(s) URL or lies inside the list's folder."""
        if is_http(path):
            return True
        if "://" not in path and not path.startswith("/"):  # relative: inside unless it climbs out
            normal = posixpath.normpath(path)
            return normal != ".." and not normal.startswith("../")
        (protocol, where), (list_protocol, folder) = _place(path), _place(_folder(self.url) or ".")
        return protocol == list_protocol and (where == folder or where.startswith(folder.rstrip("/") + "/"))

    def _partition(self, rows: Sequence[Row], path_column: str, config: Any,
                   base: Mapping[str, Sequence[Any]] | None) -> Partition:
        ignored: list[tuple[str, str, str]] = []  # (where, ref, reason)
        found: list[tuple[str, str, str, Any]] = []  # (where, path as written, split, label value)
        first_row: dict[str, str] = {}
        for where, row in rows:
            path = row.get(path_column)
            path = path.strip() if isinstance(path, str) else ""
            if not path:
                ignored.append((where, f"{redact(self.url)}#{where}", f"{where}: no path in column {path_column!r}"))
            elif path in first_row:
                ignored.append((where, redact(path), f"{where}: repeats the path of {first_row[path]}"))
            else:
                first_row[path] = where
                found.append((where, path, self._split(where, row, config, path), row.get(self.label_column)))
        class_names, labels = self._labels(found, ignored)
        units = {}
        for split in SPLITS:
            chosen = [(path, labels[path]) for _, path, s, _ in found if s == split and path in labels]
            chosen.sort(key=lambda item: (unit_interval(config.seed, item[0]), item[0]))
            chosen = chosen[: config.max_samples_per_split or len(chosen)]
            if chosen:
                items = [FileItem(path, label, "") for path, label in chosen]
                units[split] = grow_units(items, config.shard_size, (base or {}).get(split))
        if not units:
            raise ValueError(f"{redact(self.url)}: the list names no usable image ({len(ignored)} rows ignored)")
        ignored.sort(key=lambda entry: _row_number(entry[0]))  # in the list's order, whatever the reason
        return Partition(units, class_names, tuple((ref, reason) for _, ref, reason in ignored))

    def _column(self, columns: Sequence[str]) -> str:
        for name, given in (("label_column", self.label_column), ("split_column", self.split_column)):
            if given is not None and given not in columns:
                raise ValueError(
                    f"{redact(self.url)}: no column {given!r} (ListSource.{name}); columns: {list(columns)}"
                )
        if self.path_column is not None:
            if self.path_column not in columns:
                raise ValueError(f"{redact(self.url)}: no column {self.path_column!r} (ListSource.path_column); "
                                 f"columns: {list(columns)}")
            return self.path_column
        for name in PATH_COLUMNS:
            if name in columns:
                return name
        raise ValueError(f"{redact(self.url)}: no path column; expected one of {list(PATH_COLUMNS)} or "
                         f"ListSource.path_column, columns: {list(columns)}")

    def _split(self, where: str, row: Mapping[str, Any], config: Any, path: str) -> str:
        if self.split_column is None:
            return "test" if unit_interval(config.seed, path) < config.holdout_fraction else "train"
        value = row.get(self.split_column)
        split = value.strip().lower() if isinstance(value, str) else None
        if split not in SPLITS:
            raise ValueError(f"{redact(self.url)}: {where}: split {value!r} in column {self.split_column!r} "
                             "is neither 'train' nor 'test'")
        return split

    def _labels(
        self, found: Sequence[tuple[str, str, str, Any]], ignored: list[tuple[str, str, str]]
    ) -> tuple[tuple[str, ...], dict[str, int]]:
        """``(class_names, {path: label index})``; rows whose label is missing or unknown go to ``ignored``."""
        if self.label_column is None:
            return (), {path: 0 for _, path, _, _ in found}
        texts = [(where, path, value, label_text(value)) for where, path, _, value in found]
        names = self.class_names or tuple(sorted({t for *_, t in texts if t is not None}, key=_class_order))
        index = {name: i for i, name in enumerate(names)}
        labels: dict[str, int] = {}
        for where, path, value, text in texts:
            if text in index:
                labels[path] = index[text]
            elif text is not None and _INTEGER.fullmatch(text) and 0 <= int(text) < len(names):
                labels[path] = int(text)  # an index into the given class_names
            elif text is None:
                ignored.append((where, redact(path), f"{where}: no label in column {self.label_column!r}"))
            else:
                reason = f"{where}: label {value!r} is neither one of class_names nor an index"
                ignored.append((where, redact(path), reason))
        return names, labels

    def open(self) -> _ListReader:
        return _ListReader(self)


def list_format(url: str) -> str:
    """``csv``, ``tsv``, ``jsonl`` or ``parquet``, from the list file's extension."""
    extension = posixpath.splitext(urlsplit(str(url)).path if "://" in str(url) else str(url))[1].lower()
    if extension not in FORMATS:
        raise ValueError(
            f"{redact(url)}: a list file must end in one of {', '.join(FORMATS)}, got {extension or 'none'!r}"
        )
    return FORMATS[extension]


def label_text(value: Any) -> str | None:
    """A label value as the class name it stands for; None when missing. 3, 3.0 and "3" are all "3"."""
    if value is None or (isinstance(value, float) and value != value):  # NaN: a missing Parquet/JSON value
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _row_number(where: str) -> int:
    return int(where.split()[1])


def _path_text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _some(rows: Sequence[str], shown: int = 5) -> str:
    """``row 3 (line 4), row 9 (line 10) and 12 more``."""
    more = f" and {len(rows) - shown} more" if len(rows) > shown else ""
    return ", ".join(rows[:shown]) + more


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def _is_local(url: str) -> bool:
    return _protocol(url) in ("file", "local")


def _place(url: str) -> tuple[str, str]:
    """``(protocol, normalised path)`` of an absolute URL or path: a local one absolute, with
    ``..`` resolved (not symlinks), so that two spellings of one place compare equal."""
    protocol = _protocol(url)
    if protocol in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        return "file", os.path.abspath(path)
    return protocol, posixpath.normpath(url.split("://", 1)[1])


def _class_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if _INTEGER.fullmatch(name) else (1, 0, name)


def read_rows(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[list[str], list[Row]]:
    """``(columns, rows)`` of a list file; a malformed line or row fails naming the file and where."""
    kind = list_format(url)
    data = read_bytes(url, storage_options)
    if kind == "parquet":
        return _parquet_rows(url, data)
    try:
        text = data.decode("utf-8-sig")  # a BOM is what spreadsheet programs write first
    except UnicodeDecodeError as err:
        raise ValueError(f"{redact(url)}: not UTF-8 text ({err})") from err
    return _jsonl_rows(url, text) if kind == "jsonl" else _csv_rows(url, text, "\t" if kind == "tsv" else ",")


def _csv_rows(url: str, text: str, delimiter: str) -> tuple[list[str], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[Row] = []
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ValueError(f"{redact(url)}: empty; the first line must name the columns")
        header = [h.strip() for h in header]
        if len(set(header)) < len(header):
            raise ValueError(f"{redact(url)}: line 1: repeated column names in {header}")
        for values in reader:
            if not values:
                continue  # a blank line
            if len(values) != len(header):
                raise ValueError(
                    f"{redact(url)}: line {reader.line_num}: {len(values)} fields, the header has {len(header)}"
                )
            rows.append((f"row {len(rows) + 1} (line {reader.line_num})", dict(zip(header, values))))
    except csv.Error as err:
        raise ValueError(f"{redact(url)}: line {reader.line_num}: malformed CSV ({err})") from err
    return header, rows


def _jsonl_rows(url: str, text: str) -> tuple[list[str], list[Row]]:
    columns: dict[str, None] = {}  # ordered set: columns as first seen
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{redact(url)}: line {number}: not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{redact(url)}: line {number}: expected a JSON object, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        rows.append((f"row {len(rows) + 1} (line {number})", row))
    return list(columns), rows


def _parquet_rows(url: str, data: bytes) -> tuple[list[str], list[Row]]:
    try:
        import pyarrow as pa  # optional: only Parquet lists need it
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"{redact(url)}: reading Parquet lists needs pyarrow: pip install pyarrow") from err
    try:
        # The file's own reader, not `read_table`'s dataset scanner, and no thread of Arrow's
        # pools: a scanner's or pool's thread still alive when the process exits aborts it
        # (exit code 134, "terminate called without an active exception"; apache/arrow#34314).
        table = pq.ParquetFile(io.BytesIO(data), pre_buffer=False).read(use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ValueError(f"{redact(url)}: not a readable Parquet file ({err})") from err
    return list(table.column_names), [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class _ListReader(Reader):
    def __init__(self, source: ListSource):
        self.source = source
        self.folder = _folder(source.url)

    def resolve(self, path: str) -> str:
        """The URL of a path as written in the list."""
        if "://" in path or path.startswith("/") or not self.folder:
            return path
        return join(self.folder, path)

    def read(self, split: str, unit: Sequence[Sequence[Any]]) -> Iterator[SourceItem]:
        items = [FileItem(*item) for item in unit]  # tuples, or lists when the unit came back from JSON
        for i in range(0, len(items), FETCH_BATCH):
            batch = items[i : i + FETCH_BATCH]
            found: dict[int, bytes | Exception] = {}
            # One request per filesystem: a list may mix local files, buckets and web servers.
            for fs, positions, paths, url in self._by_filesystem(batch):
                found.update(zip(positions, fetch(fs, paths, url)))
            for position, item in enumerate(batch):
                data = found[position]
                if isinstance(data, TimeoutError) and self.source.timeout_s is not None:
                    reason = f"unreadable: no answer within {self.source.timeout_s:g} s (source.timeout_s)"
                    yield SourceItem(redact(item.ref), item.label, None, reason)
                elif isinstance(data, Exception):
                    yield SourceItem(redact(item.ref), item.label, None, unreadable(data))
                else:
                    yield SourceItem(redact(item.ref), item.label, data)

    def _by_filesystem(self, batch: Sequence[FileItem]) -> list[tuple[Any, list[int], list[str], str]]:
        groups: dict[int, tuple[Any, list[int], list[str], str]] = {}
        for position, item in enumerate(batch):
            url = self.resolve(item.ref)
            fs, path = filesystem(url, self.source.row_options(item.ref, url))
            group = groups.setdefault(id(fs), (fs, [], [], redact(url)))
            group[1].append(position)
            group[2].append(path)
        return list(groups.values())
