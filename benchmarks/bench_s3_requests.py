"""The S3 requests of one pipeline run, per stage folder and HTTP method, counted at a real S3
API (moto's server on 127.0.0.1): what docs/scale.md scales to ImageNet and FFHQ.

    python3 benchmarks/bench_s3_requests.py [--preset smoke] [--set KEY=VALUE ...]

Runs `vqvae2 run` on an `s3://` root, counts every request the server answered by the
first folder of its key under the root (datasets, codes, autoencoder, ... ; `.vqvae2` is
the run's turn-taking lease) and by method, then prints them with the units each stage
had (shards, code chunk objects, sample batches, trainings), and requests per unit.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET, PREFIX = "vqvae2-bench", "root"
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) /([^ ?]*)(\?[^ ]*)? HTTP')


class Counter(logging.Handler):
    """Counts the requests werkzeug logs (one line each): {(folder, method): count}."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        found = REQUEST.search(record.getMessage())
        if not found:
            return
        method, path, query = found.group(1), found.group(2), urllib.parse.parse_qs((found.group(3) or "?")[1:])
        if path.rstrip("/") == BUCKET and "prefix" in query:  # a listing: GET /bucket?list-type=2&prefix=...
            path = f"{BUCKET}/{query['prefix'][0]}"
        parts = path.split("/")
        if len(parts) > 2 and parts[0] == BUCKET and parts[1] == PREFIX:
            folder = parts[2] or "(root)"
        else:  # bulk deletes (POST /bucket?delete) name no key; the bucket's own requests
            folder = "(bulk delete)" if "delete" in query else "(bucket)"
        self.counts[folder, method] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(REPO / "tests"))
    from local_servers import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    counter = Counter()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(counter)
    werkzeug.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
           "PREFECT_HOME": tempfile.mkdtemp(prefix="bench-s3-prefect-"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        counter.counts.clear()
        started = time.perf_counter()
        extra = [arg for item in args.set for arg in ("--set", item)]
        subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", args.preset, "--root",
                        f"s3://{BUCKET}/{PREFIX}", *extra], env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        units = _units(endpoint)
    finally:
        server.stop()

    methods = ["GET", "HEAD", "PUT", "POST", "DELETE"]
    print(f"S3 requests of `vqvae2 run --preset {args.preset}` ({seconds:.0f} s), by folder under the root:")
    print("| folder | units | " + " | ".join(methods) + " | all | per unit |")
    print("|---|---|" + "---|" * (len(methods) + 2))
    folders = sorted({folder for folder, _ in counter.counts})
    for folder in folders:
        counts = [counter.counts[folder, m] for m in methods]
        count, name = units.get(folder, (None, ""))
        per_unit = f"{sum(counts) / count:.1f} per {name}" if count else "-"
        plural = name + ("es" if name.endswith("ch") else "s")
        print(f"| {folder} | {f'{count} {plural}' if count else '-'} | " + " | ".join(map(str, counts))
              + f" | {sum(counts)} | {per_unit} |")
    print("| all | | " + " | ".join(str(sum(counter.counts[f, m] for f in folders)) for m in methods)
          + f" | {sum(counter.counts.values())} | |")


def _units(endpoint: str) -> dict[str, tuple[int, str]]:
    """{folder: (units, their name)}: shards ingested (and encoded), sample batches, checkpoints written."""
    import s3fs

    fs = s3fs.S3FileSystem(key="bench", secret="bench-secret", endpoint_url=endpoint)
    root = f"{BUCKET}/{PREFIX}"
    shards = len(fs.glob(f"{root}/datasets/*/*/shard-*.tar"))
    batches = len(fs.glob(f"{root}/samples/*/batches/*.npz"))
    chunks = len([path for path in fs.find(f"{root}/codes") if "/c/" in path])
    found = {"datasets": (shards, "shard"), "codes": (chunks, "chunk object"), "samples": (batches, "batch")}
    for folder in ("autoencoder", "classifiers", "priors"):
        trainings = len(fs.glob(f"{root}/{folder}/*/model.pt"))
        found[folder] = (trainings, "training")
    return found


if __name__ == "__main__":
    main()
