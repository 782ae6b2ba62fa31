"""The pipeline's one typed config, a module per part: `PipelineConfig` (`pipeline`: a model
preset with overrides and a section per stage, its key and the `Runtime` every stage may
read), its sections (`source`, `storage`, `training`, `stages`: encode, sample, evaluate,
runner) and what they are built from (`fields`: the run-only mark, `RUN_ONLY`).

A run-only field decides no artifact: where and how fast work runs, how storage is
reached. It is in no key, and every other field is (`RUN_ONLY_FIELDS`, `config_key`).
"""
from storage.sources import FASHION_MNIST_DIR

from ..presets import PRESET_DEFAULTS
from .fields import AUTO, CONFIG, RUN_ONLY, RunOnly, Section
from .pipeline import (
    RUN_ONLY_FIELDS,
    PipelineConfig,
    PresetName,
    Runtime,
    TurnHeld,
    config_errors,
    config_key,
    deciding_fields,
    pipeline_config,
    run_only_fields,
    validate_config,
)
from .source import LABELS, LIST_SUFFIXES, SourceSection
from .stages import EncodeSection, EvaluateSection, RunnerSection, SampleSection
from .storage import StorageSection
from .training import TrainingRuntime, TrainingSection

__all__ = [
    "AUTO", "CONFIG", "FASHION_MNIST_DIR", "LABELS", "LIST_SUFFIXES", "PRESET_DEFAULTS", "RUN_ONLY", "RUN_ONLY_FIELDS",
    "EncodeSection", "EvaluateSection", "PipelineConfig", "PresetName", "RunOnly", "RunnerSection", "Runtime",
    "SampleSection", "Section", "SourceSection", "StorageSection", "TrainingRuntime", "TrainingSection", "TurnHeld",
    "config_errors", "config_key", "deciding_fields", "pipeline_config", "run_only_fields", "validate_config",
]
