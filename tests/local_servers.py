"""Servers the tests start on 127.0.0.1: a free port, and a process that is ready once it answers."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, log: Path, what: str,
               timeout: float = 240) -> None:
    """Poll `ready()` until it holds; a `process` that exits or a `timeout` fails, showing `log`'s end."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.25)


def answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running(argv: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """`argv` running with its output in `log` for the block; stopped after it."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


def serve_prefect(home: Path, port: int | None = None) -> tuple[subprocess.Popen, dict[str, str]]:
    """`prefect server start` on 127.0.0.1 (`port`, or a free one) with its database in `home`,
    once it answers: (the server, in its own process group; the environment that talks to it)."""
    import httpx

    port = port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
           "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = home / "server.log"
    with log.open("ab") as out:
        # The server knows its UI's address, as README's (PREFECT_API_URL exported first) does:
        # an automation's message links a run's page with it.
        server_env = {**{k: v for k, v in env.items() if k != "PREFECT_API_URL"}, "PREFECT_UI_URL": api[:-4]}
        server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=server_env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        return False

    wait_until(healthy, server, log, "prefect server")
    return server, env
