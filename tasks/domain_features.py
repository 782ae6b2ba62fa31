"""The pipeline's features classifier as a torch-fidelity feature extractor: the `domain` and
`self-supervised` feature spaces of `tasks.fidelity`, registered with torch-fidelity by name
(`DOMAIN_EXTRACTOR`) so its FID, KID, precision/recall and IS run on it unchanged."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import vqvae2

DOMAIN_EXTRACTOR = "vqvae2-domain-classifier"


class DomainFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """A `vqvae2.ResNetClassifier` as a torch-fidelity feature extractor.

    torch-fidelity builds it by name with `feature_extractor_weights_path`: a local
    `vqvae2.to_checkpoint` file of the classifier. Inputs must be at the resolution the
    classifier was trained at (it has global pooling, so other sizes run but mean less)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name} needs the features classifier's checkpoint: pass it as "
                             "feature_extractor_weights_path (fidelity_metrics does)")
        checkpoint = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, Mapping) or checkpoint.get("kind") != "classifier":
            raise ValueError(f"{feature_extractor_weights_path}: not a vqvae2 classifier checkpoint "
                             f"(kind {checkpoint.get('kind') if isinstance(checkpoint, Mapping) else None!r})")
        self.classifier: nn.Module = vqvae2.from_checkpoint(checkpoint)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # a few small convolutions: compiling would cost more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """uint8 (B, 3, H, W) -> the requested features, in `features_list` order."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        images = x.float() / 255
        if self.classifier.in_channels == 1:
            images = images.mean(1, keepdim=True)  # gray arrives repeated to 3 channels
        features = self.classifier.features(images)
        out = {"features": features}
        if "logits" in self.features_list:
            out["logits"] = self.classifier.fc(features)  # eval mode: the dropout before fc is the identity
        # float32, as torch-fidelity's own extractors return: float64 would triple the time of
        # KID's polynomial kernels (numpy's float64 power) for digits FID does not need here.
        return tuple(out[name].float() for name in self.features_list)


_REGISTRATION = threading.Lock()


def register_domain_extractor() -> str:
    """Register `DomainFeatureExtractor` with torch-fidelity once per process (thread-safe,
    idempotent; Dask workers register on their first evaluation); returns its name."""
    with _REGISTRATION:
        registered = FEATURE_EXTRACTORS_REGISTRY.get(DOMAIN_EXTRACTOR)
        if registered is None:
            torch_fidelity.register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)
        elif registered is not DomainFeatureExtractor:
            same = (registered.__module__, registered.__qualname__) == (DomainFeatureExtractor.__module__,
                                                                        DomainFeatureExtractor.__qualname__)
            if not same:
                raise ValueError(f"torch-fidelity already has another feature extractor named {DOMAIN_EXTRACTOR!r} "
                                 f"({registered.__module__}.{registered.__qualname__})")
            # This module was reloaded (importlib.reload in a notebook): point the name at the new class.
            FEATURE_EXTRACTORS_REGISTRY[DOMAIN_EXTRACTOR] = DomainFeatureExtractor
    return DOMAIN_EXTRACTOR
