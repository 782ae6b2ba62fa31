"""The `source` section: where the images come from, and how to read them."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from storage.sources import IdxSource, ImageFolderSource, ListSource, Source, TarSource, fashion_mnist_source, http_options
from storage.sources.image_folder import LABEL_MODES
from storage.sources.list_file import FORMATS as LIST_FORMATS

from ..credentials import block_options, refuse_secrets, refuse_userinfo
from .fields import AUTO, NOT_BLANK, RUN_ONLY, Section


class SourceSection(Section):
    kind: Literal["auto", "fashion-mnist", "idx", "image-folder", "list", "tars"] = Field(
        AUTO, description="auto: fashion-mnist without a url, else list for a .csv/.tsv/.jsonl/.ndjson/.parquet "
        "file, tars for a .tar pattern, image-folder otherwise; fashion-mnist: the Debian package's files (or a "
        "checked download); "
        "idx: MNIST-style IDX files at `url`; image-folder: a folder of images, flat or one sub-folder per class, "
        "at `url`; list: a CSV/TSV, JSON Lines or Parquet file at `url`, a row per image; tars: existing "
        "WebDataset tars (img2dataset's too), `url` a brace/glob pattern",
    )
    url: str | None = Field(None, json_schema_extra={"pattern": NOT_BLANK},
                            description="Where the source lives (any fsspec URL); fashion-mnist needs none")
    labels: str = Field(
        AUTO, json_schema_extra=lambda schema: schema.update(pattern=labels_pattern()),  # LABELS: defined below
        description="Where labels come from. image-folder: folders (the first sub-folder is the class), none, "
        "or auto (folders when every image is in a sub-folder, none when all lie at the top); list: column:NAME, "
        "none, or auto (the column `label` when there is one); tars: cls (the .cls member), json:FIELD (a field of "
        "each sample's .json, as img2dataset writes), none, or auto (cls). Unlabelled data trains unconditional "
        "priors, unless the override num_classes fixes a number",
    )
    path_column: str | None = Field(None, description="list: the column of image paths or URLs (relative ones are "
                                    "relative to the list's folder); None: the first of path, url, file, image")
    split_column: str | None = Field(None, description="list: a column of train/test; None: `ingest.holdout_fraction` "
                                     "of the images, chosen by a stable hash, are held out")
    class_names: list[str] | None = Field(None, description="Class names of an idx, list or tars source. A tars "
                                          "source without them takes the labels seen as classes 0 to the largest, "
                                          "and fails if one of those has no image (label 9 in a 3-class set): "
                                          "class names declare the classes, empty ones included")
    allow_outside: bool = Field(
        False, description="list: also read rows that lie outside the list's own folder: absolute paths, file:// "
        "URLs, ../ escapes, URLs of other buckets or filesystems. Off (the default), a list names files in its "
        "folder and below (relative paths, or absolute ones inside it) and http(s) URLs (on the hosts "
        "source.allow_private leaves it), and a list that is itself remote (s3://, http(s)://) never names a local "
        "file: a list is data, maybe someone else's, and must not pull any file the worker can read into the dataset",
    )
    # Run-only: it decides whether a list is refused, never what an accepted one becomes.
    allow_private: Annotated[bool, RUN_ONLY] = Field(
        False, description="list: also fetch http(s) rows on hosts inside the worker's network. Off (the default), "
        "a row whose host resolves to a cloud metadata or link-local address (169.254.169.254) is refused in any "
        "list, and one on a loopback, private or other non-public address in a list that is itself remote "
        "(http(s)://, s3://), the list's own host excepted: a list must not make the worker reach what only it can "
        "reach. Set it for a list you trust",
    )
    timeout_s: Annotated[float, RUN_ONLY] = Field(
        30.0, gt=0, description="Seconds an http(s) server of the source (a list file and the images it names, tars, "
        "folders, the Fashion-MNIST mirror) may take to answer: to connect, and between two pieces of a reply; a "
        "large file that keeps coming is not cut off",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the source's URL "
                                            "(no credentials: see credentials_block)")
    credentials_block: str | None = Field(None, description="Name of a Prefect Secret block whose value is the JSON "
                                          "text of the fsspec options with the source's credentials (key, secret, ...); "
                                          "without it, the worker's AWS_* environment variables or instance role")

    @property
    def resolved_kind(self) -> str:
        """The kind, `auto` decided from the URL."""
        if self.kind != AUTO:
            return self.kind
        if not self.url:
            return "fashion-mnist"
        path = self.url.split("?", 1)[0].rstrip("/").lower()
        if path.endswith(LIST_SUFFIXES):
            return "list"
        return "tars" if path.endswith(".tar") else "image-folder"

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and not url.strip():
            raise ValueError("source.url is empty: give a folder, a list file or a .tar pattern (local, s3:// or "
                             "http(s)://), or leave it out for Fashion-MNIST")
        refuse_userinfo(url, "source.url", "source.credentials_block")
        return url

    @model_validator(mode="after")
    def _url_when_needed(self) -> SourceSection:
        kind = self.resolved_kind
        if kind != "fashion-mnist" and not self.url:
            raise ValueError(f"source.url is required for a source of kind {kind!r}")
        allowed = LABELS.get(kind, (AUTO,))
        if self.labels not in allowed and not any(p.endswith(":") and self.labels.startswith(p) for p in allowed):
            raise ValueError(f"source.labels is {self.labels!r}, but a source of kind {kind!r} takes one of "
                             f"{', '.join(p + 'NAME' if p.endswith(':') else p for p in allowed)}")
        for name in ("path_column", "split_column"):
            if getattr(self, name) is not None and kind != "list":
                raise ValueError(f"source.{name} applies to a list source, not to kind {kind!r}")
        for name in ("allow_outside", "allow_private"):
            if getattr(self, name) and kind != "list":
                raise ValueError(f"source.{name} applies to a list source, not to kind {kind!r}")
        refuse_secrets(self.storage_options, "source.storage_options", "source.credentials_block")
        return self

    def build(self, download_to: str) -> Source:
        credentials = block_options(self.credentials_block, "source.credentials_block")
        options, kind = {**self.storage_options, **credentials} or None, self.resolved_kind
        if self.url and kind != "list":  # a list times its own fetches: its rows may be on other servers
            options = http_options(self.url, options, self.timeout_s)
        if kind == "fashion-mnist":
            if self.url:
                return IdxSource(self.url, storage_options=options)
            return fashion_mnist_source(download_to=download_to, storage_options=options, timeout_s=self.timeout_s)
        if kind == "idx":
            names = tuple(self.class_names) if self.class_names else IdxSource.__dataclass_fields__["class_names"].default
            return IdxSource(self.url, class_names=names, storage_options=options)
        names = tuple(self.class_names) if self.class_names else None
        if kind == "image-folder" and self.kind == AUTO and IdxSource.holds_idx_files(self.url, options):
            return IdxSource(self.url, storage_options=options)  # Fashion-MNIST's files elsewhere
        if kind == "image-folder":
            return ImageFolderSource(self.url, labels=self.labels, storage_options=options)
        if kind == "list":
            column = None if self.labels == "none" else self.labels.removeprefix("column:")
            return ListSource(self.url, path_column=self.path_column, label_column=column,
                              split_column=self.split_column, class_names=names, storage_options=options,
                              allow_outside=self.allow_outside, allow_private=self.allow_private,
                              timeout_s=self.timeout_s)
        label = {AUTO: "cls", "none": None}.get(self.labels, self.labels)
        return TarSource(self.url, class_names=names, label=label, storage_options=options)


LIST_SUFFIXES = tuple(LIST_FORMATS)
# What `source.labels` may be per kind; a trailing ':' takes a name after it.
LABELS: dict[str, tuple[str, ...]] = {
    "image-folder": LABEL_MODES,
    "list": (AUTO, "none", "column:"),
    "tars": (AUTO, "cls", "none", "json:"),
}


def labels_pattern() -> str:
    """Every form `source.labels` takes for some kind, as a JSON-schema pattern: which kind
    takes which stays the validator's to say."""
    forms = sorted({form for forms in LABELS.values() for form in forms} | {AUTO})
    return "^(" + "|".join(re.escape(form) + (".*" if form.endswith(":") else "") for form in forms) + ")$"
