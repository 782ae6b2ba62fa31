"""Watching a source for images not yet ingested, and saying so as a Prefect event.

The `watch` deployment lists its config's source on a schedule. When the source's
content digest names no complete dataset under the root (files were added, changed or
removed since the last ingest), it emits `vqvae2.source.updated`; a deployment trigger
on that event starts the pipeline (prefect.yaml, `new-data`). A digest is announced
once: the watch keeps the last one it announced in a Prefect variable per config, so a
run still ingesting it is not started again on the next tick.
"""
from __future__ import annotations

from dataclasses import dataclass

from prefect.events import emit_event
from prefect.variables import Variable

from .config import PipelineConfig, Runtime, config_key
from .machinery.reporting import logger
from .stages import ingest

EVENT = "vqvae2.source.updated"


@dataclass(frozen=True)
class SourceState:
    config_key: str  # the config key (`tasks.config.config_key`), as the UI cards of its runs carry it
    source: str  # where the source is, credentials removed
    digest: str  # the source's content digest: the dataset key's input
    ingested: bool  # a complete dataset of this digest exists under the root

    @property
    def resource_id(self) -> str:
        return f"vqvae2.source.{self.config_key}"

    @property
    def variable(self) -> str:
        return f"vqvae2-watch-{self.config_key}"


def source_state(config: PipelineConfig) -> SourceState:
    """What the source holds now, and whether it is ingested (one listing of the source)."""
    source = config.build_source()
    digest, described = source.digest(), source.describe()
    stage = ingest.STAGE
    dataset = stage.artifact(stage.settings_for(config), {"source": digest}, Runtime.of(config))
    return SourceState(config_key=config_key(config), source=described.get("url") or described["kind"],
                       digest=digest, ingested=dataset.is_complete())


def announce_new_data(config: PipelineConfig) -> bool:
    """Emit `vqvae2.source.updated` when the source holds data no complete dataset has and
    this content was not announced before; whether it did."""
    state = source_state(config)
    if state.ingested:
        logger().info(f"source {state.source}: nothing new (dataset of digest {state.digest[:12]} is complete)")
        return False
    if Variable.get(state.variable) == state.digest:
        logger().info(f"source {state.source}: its new content ({state.digest[:12]}) was announced before; "
                      "a run triggered by it ingests it")
        return False
    emit_event(event=EVENT, resource={"prefect.resource.id": state.resource_id, "prefect.resource.name": state.source},
               payload={"digest": state.digest, "source": state.source})
    Variable.set(state.variable, state.digest, overwrite=True)
    logger().info(f"source {state.source}: new content ({state.digest[:12]}), not yet ingested: emitted {EVENT}")
    return True
