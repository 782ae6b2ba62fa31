"""What every config section is built from: the frozen, strict model settings, the `auto`
value, and the mark of a run-only field."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

AUTO = "auto"


class RunOnly:
    """Marks a config field as run-only: it decides no artifact (where and how fast work
    runs, how storage is reached), so it is in no key (`config_key`, the stage keys), and
    every other field is. This mark is the one place that says which is which
    (`RUN_ONLY_FIELDS`)."""

    def __repr__(self) -> str:
        return "RUN_ONLY"


RUN_ONLY = RunOnly()  # Annotated[int, RUN_ONLY]: a run-only field
# Frozen, strict, and its errors never echo the input: a refused credential must not reach a log.
CONFIG = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Section(BaseModel):
    model_config = CONFIG
