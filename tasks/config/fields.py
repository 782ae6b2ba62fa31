"""What every config section is built from: the frozen, strict model settings, the `auto`
value, the mark of a run-only field, and the bounds a JSON schema carries for checks that
give their own messages."""
from __future__ import annotations

from typing import Any

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


# Not blank: what a check of `not value.strip()` refuses, as a JSON-schema pattern.
NOT_BLANK = r"\S"


class SchemaBounds:
    """Annotated metadata: JSON-schema keywords (`minimum`, `exclusiveMaximum`, `pattern`, ...)
    for properties of a section whose type checks them itself, in `__post_init__` or a
    validator, with a message that names the `--set` key (`ingest.max_bad_fraction must be a
    number in [0, 1), got 2.0`). Pydantic's own constraints would check first, with their
    own words; these only reach the schema, where a deployment that enforces it refuses a
    value out of range when the run is submitted, as it refuses a wrong type.

    `Annotated[ShardingOptions, SchemaBounds(max_bad_fraction={"minimum": 0, "exclusiveMaximum": 1})]`

    A pydantic section's field checked by a validator carries its bounds the same way, in
    `Field(json_schema_extra=...)`: `tests/test_parameter_schema.py` holds each schema bound
    to the check it mirrors."""

    def __init__(self, **properties: dict[str, Any]) -> None:
        self.properties = properties

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        json_schema = handler(core_schema)
        section = handler.resolve_ref_schema(json_schema)  # the definition a $ref names, edited in place
        for name, keywords in self.properties.items():
            section["properties"][name].update(keywords)  # a KeyError names a field the section lacks
        return json_schema

    def __repr__(self) -> str:
        return f"SchemaBounds({', '.join(sorted(self.properties))})"
