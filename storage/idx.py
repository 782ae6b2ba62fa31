"""Reader for the IDX format of MNIST-style datasets (LeCun et al.), plain or gzipped.

The header is two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension; the payload follows in C order.
"""
from __future__ import annotations

import gzip
import struct

import fsspec
import numpy as np

_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def idx_header(data: bytes, name: str = "<bytes>") -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, header length)`` from the first bytes of an (uncompressed) IDX file.

    Needs at most 4 + 4 * ndim bytes, so a reader can stream the rows that follow.
    """
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _DTYPES:
        raise ValueError(f"{name}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    return np.dtype(_DTYPES[data[2]]), shape, header


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes (gzip is detected by its magic number) into an array."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{name}: not a readable gzip file ({err})") from err
    dtype, shape, header = idx_header(data, name)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{name}: IDX payload has {len(data) - header} bytes, header promises {expected} "
            f"for shape {shape}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(url: str, **storage_options) -> np.ndarray:
    """Read an IDX file from any fsspec URL."""
    with fsspec.open(url, "rb", **storage_options) as f:
        return parse_idx(f.read(), name=url)
