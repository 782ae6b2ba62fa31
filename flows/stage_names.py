"""The stage names `vqvae2 stage` takes, in run order, read from the stage declarations
without running them.

Importing the stages loads torch and Prefect, seconds that `vqvae2 stage --help` (and a
mistyped stage name) should not wait for. So the names are read from the source the
declarations are written in: the `STAGES` tuple of `tasks/stages/__init__.py`, each entry
bound to a stage module's `STAGE` (`INGEST = ingest.STAGE`, or `from .count_images import
STAGE as COUNT_IMAGES`), and each module's `STAGE = Stage(name="...", ...)`. A stage added
the documented way (its module, its place in the tuple) is read so too. Declarations
written any other way (a name that is not a literal) are imported instead: slower, never
wrong; tests/test_cli.py checks both ways agree.
"""
from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "tasks.stages"


class NotLiteral(LookupError):
    """The declarations say something this reading does not follow: import them instead."""


@lru_cache(maxsize=1)
def stage_names() -> tuple[str, ...]:
    try:
        return declared_names()
    except (OSError, SyntaxError, NotLiteral):
        from flows.pipeline import STAGE_FLOWS

        return tuple(STAGE_FLOWS)


def declared_names() -> tuple[str, ...]:
    """The names as the source declares them; NotLiteral where it says them otherwise."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package; does not run it
    if spec is None or spec.origin is None:
        raise NotLiteral(f"no package {PACKAGE}")
    init = Path(spec.origin)
    body = ast.parse(init.read_text(encoding="utf-8")).body
    modules: dict[str, str] = {}  # a name bound to a stage's declaration -> its module
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            modules.update({alias.asname or alias.name: node.module for alias in node.names if alias.name == "STAGE"})
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
              and isinstance(node.value, ast.Attribute) and node.value.attr == "STAGE"
              and isinstance(node.value.value, ast.Name)):
            modules[node.targets[0].id] = node.value.value.id
    order = _assigned(body, "STAGES")
    if not isinstance(order, ast.Tuple) or not all(isinstance(e, ast.Name) and e.id in modules for e in order.elts):
        raise NotLiteral("STAGES is not a tuple of the stage modules' STAGE")
    return tuple(_declared_name(init.parent / f"{modules[e.id]}.py") for e in order.elts)


def _declared_name(module: Path) -> str:
    call = _assigned(ast.parse(module.read_text(encoding="utf-8")).body, "STAGE")
    name = next((k.value for k in getattr(call, "keywords", []) if k.arg == "name"), None)
    if not (isinstance(call, ast.Call) and isinstance(name, ast.Constant) and isinstance(name.value, str)):
        raise NotLiteral(f"{module.name}: STAGE's name is not a literal")
    return name.value


def _assigned(body: list[ast.stmt], target: str) -> ast.expr | None:
    """The value last assigned to `target` at the top of a module (`X = ...` or `X: T = ...`)."""
    value = None
    for node in body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == target for t in node.targets):
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == target:
            value = node.value
    return value
