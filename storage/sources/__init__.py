"""Where images come from: Fashion-MNIST-style IDX files, a folder of class folders, or
existing tar shards, on any fsspec URL.

A source does three things for :mod:`storage.ingest`:

- ``partition(config)`` splits its items into per-split *units*, one per output shard,
  each a small JSON-able value (an IDX row range, a list of files, a tar URL), so the
  shards can be written independently and in parallel;
- ``open()`` gives a reader whose ``read(split, unit)`` yields :class:`SourceItem` s;
- ``check()`` fails fast, naming the URL, on a missing source or a server that does not
  answer within the source's timeout (:func:`http_options`), before a run starts;
- ``digest()`` fingerprints the content: equal for an unchanged source, different for
  a changed or grown one (IDX: SHA-256 of the files; folders and tars: names, sizes and
  ETags or modification times from one listing, cheap for a nightly re-run).

Sources are frozen dataclasses, so a plan pickles them to other processes;
``storage_options`` (possibly holding credentials) is kept out of ``repr`` and of
:meth:`describe`, which is what manifests record.
"""
from .base import FileItem, Partition, Reader, Source, SourceItem, grow_units, http_options, source_digest
from .idx_folder import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MD5,
    FASHION_MNIST_MIRROR,
    IdxSource,
    fashion_mnist_source,
    fetch_fashion_mnist,
)
from .image_folder import ImageFolderSource
from .list_file import ListSource
from .tar_shards import IMAGE_EXTENSIONS, TarSource

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_MD5", "FASHION_MNIST_MIRROR", "IMAGE_EXTENSIONS", "FileItem",
    "IdxSource", "ImageFolderSource", "ListSource", "Partition", "Reader", "Source", "SourceItem", "TarSource",
    "fashion_mnist_source", "fetch_fashion_mnist", "grow_units", "http_options", "source_digest",
]  # fmt: skip
