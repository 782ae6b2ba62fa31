"""Fixtures shared by the whole suite: real data, never downloaded at test time."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Prefect reads its settings when first imported: isolate it before any test module does.
# A fresh home per session: its database, result cache and logs never leak between runs.
_PREFECT_HOME = tempfile.mkdtemp(prefix="vqvae2-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("PREFECT_API_URL", None)
# No Inception weights in the tests, and none fetched from the internet: a fetch goes to a
# port of 127.0.0.1 nothing listens on (tests that serve weights point it at their server).
os.environ["TORCH_HOME"] = os.path.join(_PREFECT_HOME, "torch-home")
os.environ["VQVAE2_INCEPTION_URL"] = "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped on a machine without CUDA (`pytest -m cuda` selects them
    on a GPU); a test that takes the smoke run is `slow`, as every test that runs a pipeline
    is: `pytest -m "not slow"` is the quick loop."""
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if skip is not None and item.get_closest_marker("cuda"):
            item.add_marker(skip)
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds waiting, a lot of it on a shared CPU.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- storage: a real S3 API (moto server over HTTP on 127.0.0.1) --------------------------
# Owned by the storage tests. s3fs, zarr and the shard loader talk to this server exactly as
# they would to AWS; credentials are dummies set only for the test that asks for a bucket.
import dataclasses  # noqa: E402
import logging  # noqa: E402
import uuid  # noqa: E402


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """A fresh, empty bucket: ``url`` plus the ``storage_options`` (or ``env``) that reach it."""

    url: str
    endpoint: str
    storage_options: dict
    env: dict


@pytest.fixture(scope="session")
def moto_endpoint():
    """``http://127.0.0.1:<free port>`` of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    from local_servers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> S3Bucket:
    """A new bucket on the moto server; AWS_* variables point at it for this test only."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "vqvae2-test-key",
        "AWS_SECRET_ACCESS_KEY": "vqvae2-test-secret-do-not-print",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": moto_endpoint,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"vqvae2-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    options = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"], "endpoint_url": moto_endpoint}
    return S3Bucket(f"s3://{bucket}", moto_endpoint, options, env)


@pytest.fixture(params=["local", "memory", "s3"])
def storage_root(request, tmp_path) -> tuple[str, dict | None]:
    """``(root URL, storage_options)`` on a local disk, in memory:// and on the moto S3 server."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket.url}/root", bucket.storage_options
    if request.param == "memory":
        return f"memory://{tmp_path.name}", None
    return str(tmp_path / "root"), None


# --- pipeline: a real Prefect API and one finished smoke run ----------------------------


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server (SQLite in the session's PREFECT_HOME) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def smoke_run(prefect_api, tmp_path_factory):
    """One full run of the `smoke` pipeline on real Fashion-MNIST: (config, root, final state)."""
    from flows.parameters import sections_of
    from flows.pipeline import vqvae2_pipeline
    from tasks.config import pipeline_config

    root = tmp_path_factory.mktemp("smoke") / "root"
    config = pipeline_config("smoke", storage={"root": str(root)})
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    assert state.is_completed(), state.message
    return config, root, state


# --- a real `prefect server` (the deployment and UI tests) ---------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env to talk to it."""
    from local_servers import serve_prefect, stop

    server, env = serve_prefect(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield env
    finally:
        stop(server)
