"""How a user names a config field, in the form of where they are.

On the command line a field is a `--set` key: `--set ingest.max_bad_fraction=0.05`, or for a
model field (an override of the preset) `--set num_classes=3`. A deployment's run takes
the config as parameters, one per section: `{"ingest": {"max_bad_fraction": 0.05}}`,
`{"overrides": {"num_classes": 3}}`. Advice and error messages that tell a user to set a
field say it in the form of where they read it: the CLI's last line, or the failure
artifact in Prefect's UI.

Light on purpose (no torch, no pydantic, no Prefect): the CLI builds its parser and prints
its failures with it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

# The config's sections a `--set` key may start with (`tasks.config.PipelineConfig`'s fields
# but `preset` and `overrides`; tests/test_config.py checks they agree). Any other key is an
# override of the model preset.
SECTIONS = ("source", "storage", "ingest", "training", "encode", "sample", "evaluate", "runner")

Form = Literal["cli", "parameters"]  # the command line, or a deployment's run parameters


def parse_value(text: str) -> Any:
    """A `--set` value: JSON where it parses (numbers, true, lists, objects), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class Setting:
    """One config field set to one value: what fixes a failure, shown in the user's form."""

    key: str  # the `--set` key: `section.field`, or a model field such as `num_classes`
    value: Any

    def shown(self, form: Form) -> str:
        if form == "cli":
            text = self.value if isinstance(self.value, str) else json.dumps(self.value)
            return f"--set {self.key}={text}"
        section, _, field = self.key.partition(".")
        if section in SECTIONS and field:
            return json.dumps({section: _nested(field, self.value)})
        return json.dumps({"overrides": {self.key: self.value}})


def _nested(dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


# "set ingest.holdout_fraction=0", "--set source.allow_outside=true": an instruction in a
# message, naming a section's field (or the model's num_classes) and the value to give it.
_INSTRUCTION = re.compile(
    r"(?<![\w-])(?:--)?set ((?:" + "|".join(SECTIONS) + r")\.[\w.]+|num_classes)=([^\s,;)]+?)(?=[.,;)]?(?:\s|$))"
)


def in_form(text: str, form: Form) -> str:
    """`text` with each instruction to set a field (`set KEY=VALUE`) written in `form`: the
    CLI's `--set KEY=VALUE`, or a deployment's parameters `set {"section": {"field": value}}`."""

    def rewrite(match: re.Match[str]) -> str:
        setting = Setting(match.group(1), parse_value(match.group(2)))
        return setting.shown("cli") if form == "cli" else f"set {setting.shown('parameters')}"

    return _INSTRUCTION.sub(rewrite, text)
