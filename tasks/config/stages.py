"""The sections of the later stages: `encode`, `sample`, `evaluate`, and the `runner`."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from storage.artifacts import IN_KEY_WHEN_SET
from storage.fsutil import holds_userinfo

from ..credentials import refuse_userinfo
from .fields import NOT_BLANK, Section


class EncodeSection(Section):
    batch_size: int = Field(256, ge=1, description="Images encoded at a time: speed only, the codes are the same")


class SampleSection(Section):
    num_samples: int | None = Field(None, ge=1, description="Images kept at each acceptance rate, spread evenly over "
                                    "the classes; None: the preset's choice")
    acceptance_rates: list[float] = Field(
        default_factory=lambda: [1.0, 0.5, 0.25, 0.1],
        json_schema_extra={"items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        description="Classifier-based rejection (paper, Sec. 4.1): at rate r, keep the r share of candidates the "
        "judge is most confident show their class; 1.0 (no rejection) is always included",
    )
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: Annotated[float | None, IN_KEY_WHEN_SET] = Field(
        None, gt=0, le=1, description="Nucleus sampling: draw each code from the fewest likeliest codes whose "
        "probabilities add up to at least top_p (0.9: the least likely tenth never drawn); None: off")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of the priors while sampling (the draw is always fp32): bf16 is 2.6x faster "
        "at the imagenet-256 paper widths on an H100 but draws other codes; fp32 stays the default until bf16's "
        "sample FID is shown equal")
    batch_size: int | None = Field(None, ge=1, description="Candidates drawn at a time (each batch with its own "
                                   "seed, so part of what is drawn); None: the preset's choice")
    seed: int = 0
    classes: list[str | int] | None = Field(
        None, json_schema_extra={"minItems": 1, "uniqueItems": True, "items": {"anyOf": [
            {"type": "string", "pattern": NOT_BLANK}, {"type": "integer", "minimum": 0}]}},
        description="Which classes to draw, by name (the dataset's class names, e.g. \"Sneaker\") or index "
        "(0 is the first class); None: every class, evenly. num_samples is spread over the classes given, in their "
        "order; each class at most once")

    @field_validator("acceptance_rates")
    @classmethod
    def _rates(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not 0 < r <= 1]
        if bad:
            raise ValueError(f"sample.acceptance_rates must lie in (0, 1], got {bad}")
        return sorted(set(rates) | {1.0}, reverse=True)

    @field_validator("classes", mode="before")
    @classmethod
    def _one_class(cls, value: Any) -> Any:
        """One class may be given alone (`--set sample.classes=Sneaker`)."""
        return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[str | int] | None) -> list[str | int] | None:
        """What needs no dataset to check (names are resolved against the dataset's by the sample stage)."""
        if classes is None:
            return None
        if not classes:
            raise ValueError("sample.classes is empty: name at least one class, or leave it unset (None) for "
                             "every class")
        bad = [c for c in classes if (isinstance(c, int) and c < 0) or (isinstance(c, str) and not c.strip())]
        if bad:
            raise ValueError(f"sample.classes: {bad} are not classes: give class names or indices (0 is the first)")
        repeated = list(dict.fromkeys(c for i, c in enumerate(classes) if c in classes[:i]))
        if repeated:
            raise ValueError(f"sample.classes names {repeated} more than once: name each class once")
        return classes


class EvaluateSection(Section):
    eval_images: int | None = Field(None, ge=4, description="Real images per reference set (held-out test images, "
                                    "and train images for the floor); None: the preset's choice")
    features: Literal["auto", "inception", "domain", "self-supervised"] = Field(
        "auto", description="Feature space of FID/KID/precision/recall: inception (torch-fidelity's Inception-v3, "
        "its weights fetched once into torch-fidelity's cache under TORCH_HOME where missing), domain (a classifier "
        "the pipeline trains on the real images' labels), self-supervised (a network the pipeline trains on the "
        "real images without labels, predicting rotations), or auto (inception for RGB images of 64 px and more or "
        "when inception_weights names its file, else domain, or self-supervised for an unconditional model: decided "
        "from the config, the same choice on every machine)",
    )
    inception_weights: str | None = Field(None, description="Path of the Inception-v3 weights file, if not in "
                                          "torch-fidelity's cache under TORCH_HOME (never fetched)")
    grid_size: int = Field(64, ge=1, le=1024, description="Images in the report's sample and reconstruction grids")

    @field_validator("inception_weights")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        refuse_userinfo(url, "evaluate.inception_weights", "storage.credentials_block")
        return url


class RunnerSection(Section):
    dask_address: str | None = Field(None, description="Run mapped and concurrent tasks on this Dask scheduler "
                                     "(tcp://host:8786); None: a thread pool in the flow's process")

    @field_validator("dask_address")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        if url is not None and holds_userinfo(url):
            raise ValueError("runner.dask_address holds a user name or password (not repeated here): the config is "
                             "a flow parameter, which Prefect stores and shows in its UI; secure the scheduler with "
                             "Dask's TLS settings on the worker instead")
        return url

