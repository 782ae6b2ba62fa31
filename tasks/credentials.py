"""Where storage credentials may come from, and where they may not.

A flow run's parameters (the pipeline config) are stored by Prefect and shown in its UI,
so credentials there are refused, naming the field and what to use instead:

- the worker's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...) or its
  instance role, which s3fs reads itself;
- a Prefect `Secret` block whose value is the JSON text of an object of fsspec options
  (`'{"key": ..., "secret": ..., "endpoint_url": ...}'`), named in the config's
  `credentials_block`: only its name travels with the run; its value is read by the flow
  and handed to the tasks, never written into a parameter, a log, a manifest or a report.
  Text, not a dict: Prefect hides a Secret's text from its API and UI, but shows a dict
  value in clear (Prefect 3.9), so a dict is refused.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# fsspec / s3fs / adlfs / gcsfs option names that hold a secret.
SECRET_OPTIONS = frozenset({
    "key", "secret", "token", "password", "passwd", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "account_key", "sas_token", "client_secret", "connection_string", "credentials",
})  # fmt: skip


def refuse_secrets(options: Mapping[str, Any], field: str, block_field: str) -> None:
    """Raise naming the first credential in `options` (nested ones included) and where it belongs."""
    for name, value in options.items():
        if name.lower() in SECRET_OPTIONS:
            raise ValueError(
                f"{field} holds {name!r}, a credential: the config is a flow parameter, which Prefect stores and "
                "shows in its UI. Give credentials to the worker instead, as AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or its instance role), or save them in a Prefect Secret block holding the "
                f"JSON text of an object of fsspec options and set {block_field} to its name"
            )
        if isinstance(value, Mapping):
            refuse_secrets(value, f"{field}.{name}", block_field)


def block_options(name: str | None, field: str) -> dict[str, Any]:
    """The fsspec options saved in the Secret block `name` ({} for None)."""
    if name is None:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).value.get_secret_value()  # as stored: get() would parse JSON text
    except ValueError as err:  # Prefect's "Unable to find block document named ..."
        raise ValueError(f"{field} is {name!r}, but there is no Secret block of that name: create one, e.g. "
                         f"Secret(value=json.dumps({{'key': ..., 'secret': ...}})).save({name!r})") from err
    if isinstance(value, Mapping):
        raise ValueError(f"{field}: the Secret block {name!r} holds a dict, which Prefect's API and UI show in clear; "
                         f"save the same options as JSON text: Secret(value=json.dumps(options)).save({name!r})")
    try:
        options = json.loads(value)
    except (TypeError, ValueError):
        options = None
    if not isinstance(options, dict):
        raise ValueError(f"{field}: the Secret block {name!r} must hold the JSON text of an object of fsspec options "
                         "(e.g. key, secret, endpoint_url)")  # its value is not repeated: it is a secret
    return options
