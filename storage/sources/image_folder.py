"""A folder of images on any fsspec URL: class folders (optionally under ``train/`` and
``test/``), or an unlabelled tree of images such as FFHQ's ``00000/``, ``01000/``, ... folders."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..fsutil import filesystem, find, fingerprint, redact, storage_errors
from .base import FileItem, Partition, Reader, SourceItem, answering, content_digest, grow_units, timeout_of, unit_interval
from .tar_shards import IMAGE_EXTENSIONS

FETCH_BATCH = 64  # files requested at once from an object store (s3fs fetches them concurrently)
LABEL_MODES = ("auto", "folders", "none")


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def fetch(fs: Any, paths: Sequence[str], url: str) -> list[bytes | Exception]:
    """The bytes of each of ``paths`` on ``fs``, or the error that kept it back, in one batch request.

    Per-file errors are returned, not raised: a missing or unreadable file becomes a
    counted skip in the manifest instead of failing the whole shard.
    """
    with storage_errors(url):
        blobs = fs.cat(list(paths), on_error="return")
    return [blobs.get(path, FileNotFoundError("not returned by the filesystem")) for path in paths]


def unreadable(error: Exception) -> str:
    return f"unreadable: {type(error).__name__}: {error}"


@dataclass(frozen=True)
class ImageFolderSource:
    """``{url}/{class}/.../{image}``, ``{url}/.../{image}`` (unlabelled), each optionally
    under ``{url}/train/`` plus ``{url}/test/``.

    ``labels``: ``"folders"``, the first folder (below ``train``/``test``) names the class;
    ``"none"``, the folder is unlabelled and every image file at any depth is an item
    (label 0; sub-folders only organise); ``"auto"``, ``"none"`` when the images lie
    directly in the folder (or directly in ``train``/``test``), else ``"folders"``.

    Without ``train``/``test`` folders, a stable hash of each file's path (and the
    config's seed) puts ``holdout_fraction`` of the files into ``test``, so files keep
    their split when the folder grows. Within a split, files are ordered by that hash,
    which mixes classes across shards. Units are :class:`FileItem` tuples, so a grown
    folder keeps its earlier shards (:func:`grow_units`). Hidden files (``.name``) are
    ignored; so are non-image files (by extension) of an unlabelled folder, which are
    often metadata. Any other file that does not decode is skipped and named in the manifest.
    """

    url: str
    labels: str = "auto"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    kind: ClassVar[str] = "image_folder"
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            modes = ", ".join(map(repr, LABEL_MODES))
            raise ValueError(f"ImageFolderSource.labels must be one of {modes}, got {self.labels!r}")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": redact(self.url), "labels": self.labels}

    def check(self) -> None:
        """The folder exists (one look, not a listing of all its files)."""
        fs, path = filesystem(self.url, self.storage_options)
        with answering(self.url, timeout_of(self.storage_options)), storage_errors(self.url):
            found = fs.isdir(path)
        if not found:
            raise FileNotFoundError(f"{redact(self.url)}: not found (no such folder); give a folder of images, a "
                                    "list file (.csv, .tsv, .jsonl, .parquet) or a .tar pattern")

    def listing(self) -> dict[str, dict]:
        """Visible files, ``{relative path: info}``."""
        files = find(self.url, self.storage_options)
        return {rel: info for rel, info in files.items() if not any(p.startswith(".") for p in rel.split("/"))}

    def digest(self) -> str:
        files = sorted((rel, fingerprint(info)) for rel, info in self.listing().items())
        return content_digest({"kind": self.kind, "labels": self.labels, "files": files})

    def partition(self, config: Any, base: Mapping[str, Sequence[Any]] | None = None) -> Partition:
        listing = self.listing()
        placed = self._place(sorted(listing), config)
        ignored = [(rel, "not inside train/ or test/") for rel, split, _ in placed if split is None]
        placed = [p for p in placed if p[1] is not None]
        mode = self._mode(placed)
        items: dict[str, list[tuple[str, str]]] = {split: [] for split in self.SPLITS}  # (rel, class name)
        for rel, split, parts in placed:
            if mode == "none" and not is_image_name(rel):
                ignored.append((rel, "not an image file"))
            elif mode == "none":
                items[split].append((rel, ""))
            elif len(parts) < 2:
                ignored.append((rel, "not inside a class folder"))
            else:
                items[split].append((rel, parts[0]))
        class_names = () if mode == "none" else tuple(sorted({cls for found in items.values() for _, cls in found}))
        if not any(items.values()):
            raise ValueError(self._nothing_found(mode, len(placed)))
        index = {name: i for i, name in enumerate(class_names)}
        units = {}
        for split, found in items.items():
            ordered = sorted(found, key=lambda item: (unit_interval(config.seed, item[0]), item[0]))
            ordered = ordered[: config.max_samples_per_split or len(ordered)]
            if ordered:
                files = [FileItem(rel, index.get(cls, 0), fingerprint(listing[rel])) for rel, cls in ordered]
                units[split] = grow_units(files, config.shard_size, (base or {}).get(split))
        return Partition(units, class_names, tuple(ignored))

    def _place(self, files: Sequence[str], config: Any) -> list[tuple[str, str | None, list[str]]]:
        """``(rel, split, path parts below the split folder)`` per file; split None: outside train/ and test/."""
        top = {rel.split("/")[0] for rel in files if "/" in rel}
        presplit = "train" in top and top <= set(self.SPLITS)
        placed = []
        for rel in files:
            parts = rel.split("/")
            if presplit:
                placed.append((rel, parts[0] if len(parts) > 1 else None, parts[1:]))
            else:
                held_out = unit_interval(config.seed, rel) < config.holdout_fraction
                placed.append((rel, "test" if held_out else "train", parts))
        return placed

    def _mode(self, placed: Sequence[tuple[str, str | None, list[str]]]) -> str:
        if self.labels != "auto":
            return self.labels
        # Decided on the image files: a stray README at the top or a metadata folder beside
        # flat images must not flip the layout. Without any image extension, on all files.
        depths = [len(parts) for rel, _, parts in placed if is_image_name(rel)] or [len(p) for _, _, p in placed]
        return "none" if depths and max(depths) == 1 else "folders"

    def _nothing_found(self, mode: str, num_files: int) -> str:
        url = redact(self.url)
        if mode == "none":
            return f"{url}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its sub-folders"
        if num_files:
            return (
                f"{url}: no class folders with files (labels={self.labels!r}; {num_files} files lie directly in the "
                "folder); expected {url}/<class>/<image>, or pass labels='none' for an unlabelled folder"
            )
        return f"{url}: no class folders with files; expected {{url}}/<class>/<image>"

    def open(self) -> _FolderReader:
        return _FolderReader(self)


class _FolderReader(Reader):
    def __init__(self, source: ImageFolderSource):
        self.fs, self.root = filesystem(source.url, source.storage_options)
        self.url = source.url

    def read(self, split: str, unit: Sequence[Sequence[Any]]) -> Iterator[SourceItem]:
        items = [FileItem(*item) for item in unit]  # tuples, or lists when the unit came back from JSON
        for i in range(0, len(items), FETCH_BATCH):
            batch = items[i : i + FETCH_BATCH]
            paths = [f"{self.root.rstrip('/')}/{item.ref}" for item in batch]
            for item, data in zip(batch, fetch(self.fs, paths, self.url)):
                if isinstance(data, Exception):
                    yield SourceItem(item.ref, item.label, None, unreadable(data))
                else:
                    yield SourceItem(item.ref, item.label, data)
