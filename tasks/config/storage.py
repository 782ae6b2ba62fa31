"""The `storage` section: the root every artifact lives under, and how to reach it."""
from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from ..credentials import refuse_secrets, refuse_userinfo
from .fields import NOT_BLANK, RUN_ONLY, Section


class StorageSection(Section):
    root: str = Field("~/vqvae2-runs", json_schema_extra={"pattern": NOT_BLANK},
                      description="Storage root, any fsspec URL: a local path, s3://bucket/prefix, "
                      "memory:// (tests). S3 credentials come from the worker's AWS_* environment variables or "
                      "instance role, or from credentials_block")
    storage_options: Annotated[dict[str, Any], RUN_ONLY] = Field(
        default_factory=dict, description="fsspec options for the root, e.g. {'endpoint_url': 'http://minio:9000'} "
        "(no credentials: see credentials_block)",
    )
    credentials_block: Annotated[str | None, RUN_ONLY] = Field(
        None, description="Name of a Prefect Secret block whose value is the JSON text of the fsspec options with "
        "the root's credentials (key, secret, ...)",
    )
    turn_bound_s: Annotated[float, RUN_ONLY] = Field(
        60.0, ge=4, description="Seconds a run's heartbeat under the root may stand still before another run "
        "takes over its turn (the run is taken for gone: killed, or frozen); it beats every quarter of this. Raise "
        "it where the root's storage can stall longer (a congested object store)",
    )

    @field_validator("root")
    @classmethod
    def _not_empty(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("storage.root must not be empty")
        refuse_userinfo(root, "storage.root", "storage.credentials_block")
        return root

    @model_validator(mode="after")
    def _no_credentials(self) -> StorageSection:
        refuse_secrets(self.storage_options, "storage.storage_options", "storage.credentials_block")
        return self

    @property
    def url(self) -> str:
        """The root as used: `~` expanded on the machine that runs the flow, not the one that deployed it."""
        return os.path.expanduser(self.root) if self.root.startswith("~") else self.root

