"""Fixtures shared by the whole suite: real data, never downloaded at test time."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

FASHION_MNIST_DIR = Path(os.environ.get("VQVAE2_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Directory of the real Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"Fashion-MNIST is not at {FASHION_MNIST_DIR}: run `apt-get install -y dataset-fashion-mnist` "
            "(bash .ci/install does) or point VQVAE2_FASHION_MNIST at the IDX files"
        )
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def fashion_mnist_test_split(fashion_mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real test images (uint8, N x 28 x 28) and their labels."""
    from storage.idx import read_idx

    images = read_idx(str(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(str(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz"))
    return images, labels
