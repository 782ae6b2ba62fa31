"""Where storage credentials may come from, and where they may not.

A flow run's parameters (the pipeline config) are stored by Prefect and shown in its UI,
so credentials there are refused, naming the field (never the value) and what to use
instead. That includes a URL's user part (`s3://AKID:SECRET@bucket`, `https://TOKEN@host`):
a bare `user@` is refused too, since tokens often travel alone in that place and a URL
cannot say which it holds. Credentials belong in:

- the worker's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
  ...) or its instance role, which s3fs reads itself;
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

from storage.fsutil import holds_userinfo

# fsspec / s3fs / adlfs / gcsfs option names that hold a secret.
SECRET_OPTIONS = frozenset({
    "key", "secret", "token", "password", "passwd", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "account_key", "sas_token", "client_secret", "connection_string", "credentials",
})  # fmt: skip


def refuse_secrets(options: Mapping[str, Any], field: str, block_field: str) -> None:
    """Raise naming the first credential in `options` (nested ones included, and URLs with a
    user part such as an `endpoint_url`) and where it belongs."""
    for name, value in options.items():
        if name.lower() in SECRET_OPTIONS:
            raise ValueError(f"{field} holds {name!r}, a credential: {_WHERE_INSTEAD.format(block_field=block_field)}")
        if isinstance(value, str):
            refuse_userinfo(value, f"{field}.{name}", block_field)
        if isinstance(value, Mapping):
            refuse_secrets(value, f"{field}.{name}", block_field)


def refuse_userinfo(url: str | None, field: str, block_field: str) -> None:
    """Raise, naming `field` but not its value, if the URL `url` holds a user name or password."""
    if url is not None and holds_userinfo(url):
        raise ValueError(
            f"{field} holds a user name or password (the userinfo before '@' in the URL, not repeated here), which "
            "Prefect would store and show in its UI: give the URL without it, and the credentials to the worker "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or its instance role) or in a Prefect Secret "
            f"block named in {block_field}"
        )


_WHERE_INSTEAD = (
    "the config is a flow parameter, which Prefect stores and shows in its UI. Give credentials to the worker "
    "instead, as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE (or its instance role), or save them in a "
    "Prefect Secret block holding the JSON text of an object of fsspec options and set {block_field} to its name"
)


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
