"""The watch flow on a real Prefect API and a real folder of images: nothing to say while
the folder's content is ingested, one event when it grows, and only one for that content.
(The deployment trigger that acts on the event is in tests/test_deployment.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from prefect.variables import Variable

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS, watch_flow
from tasks.source_watch import source_state
from pipeline_helpers import log_lines, smoke_config

pytestmark = pytest.mark.slow


def _write(folder: Path, images, labels, first: int, count: int) -> None:
    for i in range(first, first + count):
        path = folder / f"class{labels[i]}" / f"img{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path)


def test_the_watch_announces_new_images_once_and_an_ingested_folder_never(prefect_api, tmp_path,
                                                                          fashion_mnist_test_split):
    images, labels = fashion_mnist_test_split
    folder = tmp_path / "incoming"
    _write(folder, images, labels, 0, 60)
    config = smoke_config(str(tmp_path / "root"), source={"url": str(folder)}, overrides={"num_classes": "auto"})

    assert watch_flow(**sections_of(config)) is True  # nothing ingested yet: announced
    state = source_state(config)
    assert Variable.get(state.variable) == state.digest and not state.ingested

    STAGE_FLOWS["ingest"](**sections_of(config))
    ingested = watch_flow(**sections_of(config), return_state=True)
    assert ingested.result() is False
    assert log_lines(ingested.state_details.flow_run_id, "nothing new")

    _write(folder, images, labels, 60, 5)  # files land
    grown = source_state(config)
    assert grown.digest != state.digest and not grown.ingested and grown.config_key == state.config_key
    assert watch_flow(**sections_of(config)) is True
    again = watch_flow(**sections_of(config), return_state=True)  # the run it started may still be ingesting
    assert again.result() is False
    assert log_lines(again.state_details.flow_run_id, "announced before")
    assert Variable.get(grown.variable) == grown.digest
