"""A flow run's tags: what it runs and its preset, beside those its deployment gave it."""
from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from .reporting import in_prefect_run


def tag_run(what: str, preset: str) -> None:
    """Tag this flow run `vqvae2`, with what it runs (`pipeline`, `stage:sample`, `watch`) and
    its preset (`preset:smoke`), beside the tags its deployment gave it: the UI's filters by
    tag find a kind of run, as every flow is named `vqvae2` and every run keeps its one name."""
    if not in_prefect_run():
        return
    run_id = flow_run.get_id()
    with get_client(sync_client=True) as client:
        tags = set(client.read_flow_run(run_id).tags) | {"vqvae2", what, f"preset:{preset}"}
        client.update_flow_run(run_id, tags=sorted(tags))
