"""The flows' parameters: the config's sections (preset, overrides, source, storage, ...),
each a top-level parameter with its own form in Prefect's UI.

Prefect merges a run's parameters over its deployment's by top-level key. With one
`config` parameter, a run that set `{"config": {"sample": ...}}` threw away the source
and storage its deployment chose; with a parameter per section, `{"sample": ...}` keeps
them. The signature is derived from `PipelineConfig`'s fields, so a new section becomes
a parameter of every flow without being written twice.

Its schema (each section's, with the bounds the config checks) is what a deployment
enforces when a run is submitted: `{"ingest": {"max_bad_fraction": 2.0}}` is refused then,
naming the field. What only the whole config can tell (a bad model override, a cross-field
rule) is checked once the run starts, by `config_of`, inside the run's failure report: the
flows leave Prefect's own validation of their parameters off, which would fail such a run
before it, without the report.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import SkipJsonSchema

from tasks.config import PipelineConfig, validate_config
from tasks.machinery.failure_report import reported_failure

T = TypeVar("T")

SECTIONS: tuple[str, ...] = tuple(PipelineConfig.model_fields)


def _shown(value: Any) -> Any:
    """A default as the form shows it: without the fields kept out of the schema (test-only)."""
    if not isinstance(value, BaseModel):
        return value
    hidden = {name for name, field in type(value).model_fields.items()
              if any(isinstance(m, SkipJsonSchema) for m in field.metadata)}
    return {name: _shown(getattr(value, name)) for name in type(value).model_fields if name not in hidden}


def _parameter(name: str) -> inspect.Parameter:
    field = PipelineConfig.model_fields[name]
    # Pydantic keeps a field's `Annotated` extras apart from its type; given back, the schema
    # gets the bounds they carry (`tasks.config.fields.SchemaBounds`).
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                             default=_shown(field.get_default(call_default_factory=True)))


SIGNATURE = inspect.Signature([_parameter(name) for name in SECTIONS])


def _args_doc() -> str:
    """Google-style `Args:`, which Prefect shows as each parameter's description."""
    lines = [f"    {name}: {PipelineConfig.model_fields[name].description or name.capitalize()}" for name in SECTIONS]
    return "Args:\n" + "\n".join(lines)


def config_of(sections: dict[str, Any]) -> PipelineConfig:
    """The config of a flow run's parameters (section models or their plain values); its
    errors name each field by its `--set` key (`validate_config`)."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise TypeError(f"unknown parameters {sorted(unknown)}: a flow takes the config's sections {list(SECTIONS)}")
    plain = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in sections.items()}
    return validate_config(plain)


def sections_of(config: PipelineConfig) -> dict[str, Any]:
    """`config` as a flow's parameters: `flow(**sections_of(config))`."""
    return {name: getattr(config, name) for name in SECTIONS}


def taking_sections(run: Callable[[PipelineConfig], T]) -> Callable[..., T]:
    """`run(config)` as a function with a parameter per config section, as a flow takes them:
    its name, and its docstring with each section's description added. Make it a flow with
    `validate_parameters=False`: it validates them itself (see the module's docstring)."""

    def from_sections(*args: Any, **sections: Any) -> T:
        # Every failure of the run gets its card and one ERROR record: a config refused here,
        # or whatever `run` does not report itself (a stage's failure is reported, and named, there).
        with reported_failure():
            return run(config_of(SIGNATURE.bind(*args, **sections).arguments))

    from_sections.__signature__ = SIGNATURE  # what Prefect's form and a deployment's schema read
    from_sections.__name__, from_sections.__qualname__ = run.__name__, run.__qualname__
    from_sections.__module__ = run.__module__
    from_sections.__doc__ = f"{inspect.getdoc(run) or ''}\n\n{_args_doc()}"
    return from_sections
