"""Bad parameters are refused at the door, and a failure that reaches a run is said once.

The flows' parameter schema carries the config's ranges and patterns, so a deployment (which
enforces its schema) refuses `{"ingest": {"max_bad_fraction": 2.0}}` when the run is
submitted, naming the field. A run that fails anyway (what only the whole config can tell, a
missing source) publishes the failure card and leaves one ERROR record on the server, with
the why and what to do; Prefect's own records of it, tracebacks included, stay at DEBUG.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.exceptions import PrefectHTTPStatusError
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError as SchemaError
from prefect.utilities.schema_tools.validation import validate

from flows.parameters import config_of, sections_of
from flows.pipeline import vqvae2_pipeline
from tasks.machinery.failure_report import KEY
from pipeline_helpers import artifacts, smoke_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = parameter_schema(vqvae2_pipeline).model_dump_for_openapi()


def _schema_refuses(params: dict[str, Any]) -> str | None:
    """What the server says of `params` (the same validation it runs), None if it takes them."""
    try:
        validate(params, SCHEMA, raise_on_error=True)
    except SchemaError as err:
        return str(err)
    return None


def _config_refuses(params: dict[str, Any]) -> str | None:
    try:
        config_of(params)
    except ValueError as err:
        return str(err)
    return None


# --- the schema holds the config's own checks ---------------------------------------------

NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _numeric_probes(bounds: dict[str, Any], integer: bool) -> list[tuple[Any, bool]]:
    """(value, accepted) on both sides of each numeric bound."""
    step = 1 if integer else 0.01
    probes = []
    for keyword, bound in bounds.items():
        if keyword == "minimum":
            probes += [(bound, True), (bound - step, False)]
        elif keyword == "maximum":
            probes += [(bound, True), (bound + step, False)]
        elif keyword == "exclusiveMinimum":
            probes += [(bound, False), (bound + step, True)]
        elif keyword == "exclusiveMaximum":
            probes += [(bound, False), (bound - step, True)]
    return probes


def _is_integer(schema: dict[str, Any]) -> bool:
    kinds = {schema.get("type")} | {branch.get("type") for branch in schema.get("anyOf", [])}
    return "integer" in kinds and "number" not in kinds


def _section_fields() -> list[tuple[str, str, dict[str, Any]]]:
    """(section, field, the field's schema) of every section the schema defines."""
    fields = []
    for section, prop in SCHEMA["properties"].items():
        if "$ref" in prop:
            definition = SCHEMA["definitions"][prop["$ref"].rsplit("/", 1)[1]]
            fields += [(section, name, field) for name, field in definition["properties"].items()]
    return fields


def _bounded_fields() -> list[tuple[str, str, Any, bool]]:
    """(section, field, value, accepted) for every numeric bound in the schema, of a field or
    of its items: walked, so a bound added tomorrow is probed too."""
    found = []
    for section, name, field in _section_fields():
        bounds = {k: field[k] for k in NUMERIC if k in field}
        found += [(section, name, v, ok) for v, ok in _numeric_probes(bounds, _is_integer(field))]
        items = field.get("items", {})
        bounds = {k: items[k] for k in NUMERIC if k in items}
        found += [(section, name, [v], ok) for v, ok in _numeric_probes(bounds, _is_integer(items))]
    return found


BOUNDED = _bounded_fields()


def test_the_schema_bounds_what_the_config_checks_itself():
    """The ranges a validator or `__post_init__` checks with its own message reach the schema
    (pydantic's own constraints always did)."""
    refused = {(section, field, str(value)) for section, field, value, ok in BOUNDED if not ok}
    assert {("ingest", "max_bad_fraction", "1"), ("ingest", "max_bad_fraction", "-0.01"),
            ("ingest", "holdout_fraction", "1"), ("ingest", "shard_size", "0"), ("ingest", "min_size", "-1"),
            ("ingest", "quality", "0"), ("ingest", "quality", "101"), ("ingest", "max_samples_per_split", "0"),
            ("training", "processes", "0"), ("sample", "acceptance_rates", "[0]"),
            ("sample", "acceptance_rates", "[1.01]")} <= refused


@pytest.mark.parametrize("section, field, value, accepted", BOUNDED,
                         ids=[f"{s}.{f}={v}" for s, f, v, _ in BOUNDED])
def test_each_numeric_bound_refuses_what_the_config_refuses(section, field, value, accepted):
    params = {section: {field: value}}
    schema, config = _schema_refuses(params), _config_refuses(params)
    assert (schema is None, config is None) == (accepted, accepted), (schema, config)
    if not accepted:
        assert f"'{section}.{field}" in schema  # the server's message names the field


# Patterns and list rules cannot be probed from the schema alone: (params, accepted).
SHAPED = [
    ({"storage": {"root": "/runs"}}, True), ({"storage": {"root": " "}}, False),
    ({"source": {"url": "/data/images"}}, True), ({"source": {"url": "  "}}, False),
    ({"source": {"url": "/data/list.csv", "labels": "column:kind"}}, True),
    ({"source": {"url": "/data/shards/{0..3}.tar", "labels": "json:label"}}, True),
    ({"source": {"url": "/data/images", "labels": "folder"}}, False),
    ({"training": {"rdzv_endpoint": "node0:29500"}}, True), ({"training": {"rdzv_endpoint": "node0"}}, False),
    ({"training": {"processes": "auto"}}, True),
    ({"sample": {"classes": ["Sneaker", 0]}}, True), ({"sample": {"classes": []}}, False),
    ({"sample": {"classes": [" "]}}, False), ({"sample": {"classes": [-1]}}, False),
    ({"sample": {"classes": ["Bag", "Bag"]}}, False), ({"sample": {"classes": None}}, True),
]
SHAPED_FIELDS = {(section, field) for params, _ in SHAPED for section, fields in params.items() for field in fields}


@pytest.mark.parametrize("params, accepted", SHAPED, ids=[str(p) for p, _ in SHAPED])
def test_each_pattern_refuses_what_the_config_refuses(params, accepted):
    schema, config = _schema_refuses(params), _config_refuses(params)
    assert (schema is None, config is None) == (accepted, accepted), (schema, config)


def test_every_pattern_and_list_rule_in_the_schema_is_probed():
    def shaped(schema: Any) -> bool:
        if isinstance(schema, dict):
            return bool({"pattern", "minItems", "uniqueItems"} & set(schema)) or any(map(shaped, schema.values()))
        return isinstance(schema, list) and any(map(shaped, schema))

    fields = {(section, name) for section, name, field in _section_fields() if shaped(field)}
    assert fields and fields <= SHAPED_FIELDS, fields - SHAPED_FIELDS


def test_every_deployment_enforces_the_schema():
    """Prefect checks a run's parameters at submission only where its deployment enforces
    its schema: `prefect deploy`'s default, which no deployment of prefect.yaml turns off."""
    from prefect.deployments.runner import RunnerDeployment

    assert RunnerDeployment.model_fields["enforce_parameter_schema"].default is True
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert all(d.get("enforce_parameter_schema", True) is True for d in project["deployments"])


# --- on a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(prefect_api, tmp_path_factory):
    """The pipeline deployed as prefect.yaml deploys it (the flow's schema, enforced), no worker:
    a run that passes the door is created and waits."""
    root = tmp_path_factory.mktemp("schema") / "root"
    return vqvae2_pipeline.to_deployment(
        name="parameter-schema", parameters={"preset": "smoke", "storage": {"root": str(root)}}).apply()


def test_a_value_out_of_range_is_refused_at_submission_naming_the_field(deployment):
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment, parameters={"ingest": {"max_bad_fraction": 2.0}})
        assert refused.value.response.status_code == 409
        detail = refused.value.response.json()["detail"]
        assert "'ingest.max_bad_fraction'" in detail and "maximum of 1" in detail, detail
        run = client.create_flow_run_from_deployment(deployment, parameters={"ingest": {"max_bad_fraction": 0.05}})
        assert run.parameters["ingest"] == {"max_bad_fraction": 0.05} and run.state.is_scheduled()
        assert run.parameters["storage"]["root"].endswith("root")  # the deployment's own sections kept


def _logs(flow_run_id, last: str, timeout: float = 30.0) -> list[Any]:
    """The run's log records, oldest first, once the one containing `last` has arrived."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(last in log.message for log in logs) or time.monotonic() > deadline:
                return sorted(logs, key=lambda log: log.timestamp)
            time.sleep(0.25)


def _one_error(logs: list[Any]) -> str:
    errors = [log.message for log in logs if log.level >= 40]
    assert len(errors) == 1, [(log.level, log.message[:200]) for log in logs]
    assert "\n" not in errors[0] and "what to do: " in errors[0]
    return errors[0]


def _failure_card(flow_run_id) -> str:
    cards = [a for a in artifacts(flow_run_id) if (a.key or "").startswith(KEY) and a.type == "markdown"]
    assert len(cards) == 1, [a.key for a in artifacts(flow_run_id)]
    return cards[0].data


@pytest.mark.slow  # a run, if one that fails in a second
def test_a_config_refused_in_the_worker_fails_with_the_card_and_one_error(deployment):
    """What the schema cannot tell (an override the model does not have) is refused once the
    run starts, as a worker's engine runs it (`python -m prefect.engine`): the failure card,
    one ERROR record; the engine's own records, tracebacks included, at DEBUG."""
    from prefect.flow_engine import load_flow_run, run_flow
    from prefect.logging.loggers import flow_run_logger

    with get_client(sync_client=True) as client:
        created = client.create_flow_run_from_deployment(deployment, parameters={
            "overrides": {"autoencoder.chanels": 3}})
    flow_run = load_flow_run(created.id)
    with pytest.raises(ValueError, match=r"invalid configuration: .*autoencoder\.chanels"):
        run_flow(vqvae2_pipeline, flow_run=flow_run, error_logger=flow_run_logger(flow_run=flow_run))
    logs = _logs(created.id, "Engine execution exited")
    error = _one_error(logs)
    assert error.startswith("vqvae2 run failed before its stages started: ValueError: invalid configuration: ")
    assert "autoencoder.chanels" in error and "fix the cause named above" in error
    debug = [log.message for log in logs if log.level == 10]
    assert any(m.startswith("Engine execution exited with unexpected exception") for m in debug), debug
    assert any("Traceback (most recent call last)" in m for m in debug)
    card = _failure_card(created.id)
    assert card.startswith("# vqvae2 run failed before its stages started\n") and "autoencoder.chanels" in card


@pytest.mark.slow  # a run, if one that fails in a second
def test_a_missing_source_fails_with_the_card_and_one_error(prefect_api, tmp_path):
    missing = tmp_path / "nowhere"
    config = smoke_config(str(tmp_path / "root"), source={"url": str(missing)})
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    logs = _logs(flow_run_id, "Flow run encountered an exception")  # the run's last record
    error = _one_error(logs)
    assert error.startswith("vqvae2 run failed in stage ingest: FileNotFoundError: ") and str(missing) in error
    assert not any("computing cache key" in log.message for log in logs)  # the key gives way; the unit says why
    assert any("Traceback (most recent call last)" in log.message for log in logs if log.level == 10)
    card = _failure_card(flow_run_id)
    assert card.startswith("# vqvae2 run failed in stage `ingest`\n") and str(missing) in card
