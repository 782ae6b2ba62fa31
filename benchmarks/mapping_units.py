"""The units `bench_mapping.py` maps: importable by name, as a Dask worker needs them.

`bare` is a Prefect task that does nothing; `cached` is one as the pipeline's mapped units
are (`tasks.machinery.cached.cached_unit`): a cache key that looks for its marker, a marker
and a cache record written under the storage root. Neither computes anything, so a
flow's time over them is orchestration alone.
"""
from __future__ import annotations

from prefect import flow, task, unmapped

from tasks.machinery.artifacts import Artifact, Marker
from tasks.machinery.cached import cached_unit, with_records
from tasks.manifests import Record


class Done(Record):
    index: int


def add_one(index: int, root: str) -> int:
    return index + 1


bare = task(add_one, name="bare-unit", task_run_name="bare-{index}")


def _marker(index: int, root: str) -> Marker[Done]:
    return Artifact(root, "bench", "0" * 16).unit_marker(f"unit-{index:06d}", Done)


@cached_unit(locate=_marker, name="cached-unit", task_run_name="cached-{index}")
def cached(index: int, root: str) -> Done:
    return Done(index=index)


@flow(name="bench-mapping")
def mapped(units: int, root: str, kind: str) -> int:
    unit = with_records(cached, root, None) if kind == "cached" else bare
    return len([future.result() for future in unit.map(range(units), unmapped(root))])
