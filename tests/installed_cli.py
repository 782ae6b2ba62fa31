"""The installed `vqvae2` command as a user runs it: its own PREFECT_HOME, on a Prefect server or
in ephemeral mode; and whether Prefect started at all."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def installed(argv: list[str], home: Path, cwd: Path, timeout: float = 600,
              api: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """The installed `vqvae2` command with its own PREFECT_HOME, on the Prefect server at `api`
    or in ephemeral mode; (its result, seconds it took)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **({"PREFECT_API_URL": api} if api else {}))
    started = time.monotonic()
    done = subprocess.run(["vqvae2", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def prefect_started(home: Path) -> bool:
    """Whether Prefect started in the home a command ran with: its temporary server makes a database there."""
    return any(home.glob("*.db"))
