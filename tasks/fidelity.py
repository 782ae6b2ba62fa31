"""Sample quality through torch-fidelity: FID, KID, precision/recall and Inception Score.

VQ-VAE-2 (Razavi et al. 2019, Sec. 4.1, Fig. 5) reports FID and IS with Inception-v3
features and precision/recall (Kynkäänniemi et al. 2019) along its rejection-sampling
curve. This module computes the same metrics with torch-fidelity's own implementations
on in-memory uint8 images, in one of two feature spaces, always stated:

- `inception`: torch-fidelity's `inception-v3-compat` (the TF FID network, pool3 2048-d),
  its weights fetched once into torch-fidelity's cache where missing (`tasks.inception`).
- `domain`: the pipeline's *features* classifier (`tasks.stages.train_classifier`, role
  `features`), registered with torch-fidelity under `DOMAIN_EXTRACTOR`: its penultimate
  layer for FID/KID/precision-recall, its logits for IS. It is trained with another seed
  than the *judge* that scores rejection sampling, so FID does not reward samples for
  pleasing the very network that selected them.
- `self-supervised`: for unlabelled data, the same ResNet trained without labels to predict
  which quarter turn each image was given (`vqvae2.rotation_loss`; Gidaris et al. 2018):
  penultimate features for FID/KID/precision/recall, and no IS (rotation logits say nothing
  of classes).
- `auto`: inception for RGB images of 64 px and more, or when `evaluate.inception_weights`
  names a file; otherwise domain (self-supervised for an unconditional model). Decided from
  the config alone (`auto_features`), logged and recorded. The three spaces give
  incomparable numbers: every report names its own.

    extractor = resolve_extractor("auto", domain_checkpoint=features_manifest["model"], images=ImageKind(1, 32, True))
    metrics = fidelity_metrics(sample_images_uint8, test_images_uint8, extractor)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from storage.checkpoints import load_checkpoint
from storage.fsutil import exists, redact

from .domain_features import DOMAIN_EXTRACTOR, DomainFeatureExtractor, register_domain_extractor
from .inception import INCEPTION_WEIGHTS_FIELD, inception_weights
# Re-exported: callers have always found them here.
from .inception import InceptionWeightsMissing, inception_cache_path  # noqa: F401
from .manifests import from_root

if TYPE_CHECKING:
    from .config import PipelineConfig


FEATURES = ("auto", "inception", "domain", "self-supervised")
INCEPTION_EXTRACTOR = "inception-v3-compat"
# `auto` measures RGB images this large in Inception features: the papers' datasets (ImageNet,
# FFHQ, LSUN, CelebA-HQ) publish Inception FIDs at these sizes; smaller or gray images are
# far from what Inception saw, and the pipeline's own features describe them better.
AUTO_INCEPTION_MIN_SIZE = 64
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; smaller sets use their own size
ISC_SPLITS = 10  # the IS convention (Salimans et al. 2016): mean and std over 10 splits...
ISC_MIN_SPLIT = 100  # ...but never splits of fewer images than this (small sets get fewer splits)
LOG = logging.getLogger("vqvae2.fidelity")  # plain logging: no Prefect here; the pipeline relays
PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019), torch-fidelity's default
MIN_IMAGES = PRC_NEIGHBORHOOD + 1  # per set: k-NN radii need k other points


class FidelityImages(Dataset):
    """Images as torch-fidelity takes them: item i is a uint8 (3, H, W) tensor.

    `images`: uint8 (N, C, H, W) with C = 1 or 3, or (N, H, W) gray, as a tensor or array;
    gray is repeated to 3 channels (what Inception expects; the domain classifier
    averages them back)."""

    def __init__(self, images: Tensor | np.ndarray) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise ValueError(f"fidelity images must be uint8 in [0, 255], got {images.dtype}; convert floats in "
                             "[0, 1] with (images * 255).round().to(torch.uint8)")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"fidelity images must be (N, C, H, W) with C = 1 or 3, or (N, H, W), got "
                             f"{tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index].expand(3, -1, -1)


class ImageKind(NamedTuple):
    """What `features: auto` decides from: the config's images and labels, never the machine."""

    channels: int
    size: int
    labelled: bool

    @classmethod
    def of(cls, model: Any) -> ImageKind:
        """Of a model config, or of its dict (as a stage's settings hold it)."""
        get = model.get if isinstance(model, Mapping) else lambda name: getattr(model, name)
        return cls(get("image_channels"), get("image_size"), bool(get("num_classes")))

    @property
    def inception_sized(self) -> bool:
        return self.channels == 3 and self.size >= AUTO_INCEPTION_MIN_SIZE

    def __str__(self) -> str:
        return f"{'RGB' if self.channels == 3 else 'gray' if self.channels == 1 else f'{self.channels}-channel'} " \
               f"images of {self.size} px"


def auto_features(inception_weights: str | None, images: ImageKind | None, labelled: bool = True) -> tuple[str, str]:
    """What `features: auto` measures in, and why: inception where `inception_weights` names a
    file or the images are RGB of `AUTO_INCEPTION_MIN_SIZE` px and more; otherwise domain, or
    self-supervised without labels (`images.labelled`, or `labelled` where `images` is unknown).
    Never the machine's cache or network: the choice decides which classifiers train, so keys."""
    if inception_weights:
        return "inception", f"{INCEPTION_WEIGHTS_FIELD} names its weights"
    if images is not None and images.inception_sized:
        return "inception", (f"the config's images are {images} (auto takes Inception for RGB of "
                             f"{AUTO_INCEPTION_MIN_SIZE} px and more: FIDs comparable with published ones)")
    shape = (f"the config's images are {images}, not RGB of {AUTO_INCEPTION_MIN_SIZE} px and more, and "
             if images is not None else "")
    own = "domain" if (images.labelled if images is not None else labelled) else "self-supervised"
    return own, f"{shape}no Inception weights are named ({INCEPTION_WEIGHTS_FIELD})"


def _alternatives(images: ImageKind | None, labelled: bool) -> str:
    """The feature spaces a user without Inception's weights may choose, as the error says them."""
    own = "domain" if (images.labelled if images is not None else labelled) else "self-supervised"
    return f"features={own!r}" + (" or 'auto'" if images is None or not images.inception_sized else "")


@dataclasses.dataclass(frozen=True)
class Extractor:
    """The feature space of one evaluation: what torch-fidelity runs and what the report says."""

    requested: str  # the config's choice: auto, inception, domain or self-supervised
    kind: str  # what it resolved to: inception, domain or self-supervised
    name: str  # torch-fidelity's registry name
    weights: str  # inception: a local file; domain: the features classifier's model.pt URL
    description: str
    feature_layers: dict[str, str]  # metric (isc, fid, kid, prc) -> feature layer
    storage_options: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    reason: str | None = None  # why `auto` picked this kind (None: asked for by name)

    def summary(self) -> str:
        """One line for the run's log: the feature space, and why where `auto` picked it."""
        why = f", picked by features=auto because {self.reason}" if self.reason else ""
        return f"fidelity features: {self.kind} ({self.name}){why}"

    def report(self, root: str | None = None) -> dict[str, Any]:
        """JSON-able, for report.json (no storage options: they may hold credentials); weights
        under the storage `root` are named by their path from it, so a moved root's report holds."""
        weights = redact(self.weights)
        shown = from_root(weights, root) if root else weights
        return {"features": self.requested, "extractor": self.name, "kind": self.kind, "weights": shown,
                "description": self.description.replace(weights, shown), "feature_layers": dict(self.feature_layers)}


def _layers(cls: type) -> dict[str, str]:
    return {metric: cls.get_default_feature_layer_for_metric(metric) for metric in ("isc", "fid", "kid", "prc")}


def resolve_extractor(choice: str, *, inception_weights: str | None = None, domain_checkpoint: str | None = None,
                      storage_options: dict[str, Any] | None = None, self_supervised: bool = False,
                      images: ImageKind | None = None) -> Extractor:
    """The extractor for `choice` (auto | inception | domain | self-supervised), checked to be usable now.

    `inception_weights`: a local file (the config field `evaluate.inception_weights`);
    None: torch-fidelity's cached file, fetched once where missing (`tasks.inception`).
    `domain_checkpoint`: URL of the *features* classifier's `model.pt` (never the judge's);
    `self_supervised`: whether that classifier learned rotations rather than labels.
    `images`: the config's images, which `auto` decides from (None: only a named file picks Inception).
    """
    if choice not in FEATURES:
        raise ValueError(f"features must be one of {list(FEATURES)}, got {choice!r}")
    kind, reason = auto_features(inception_weights, images, not self_supervised) if choice == "auto" else (choice, None)
    if kind == "inception":
        weights = inception_weights_for(choice, inception_weights, images, not self_supervised)
        extractor = Extractor(
            choice, "inception", INCEPTION_EXTRACTOR, weights,
            f"{reason + '; ' if reason else ''}Inception-v3 (torch-fidelity {INCEPTION_EXTRACTOR}, the TF FID network) "
            f"from {weights}: pool3 (2048-d) features for FID, KID and precision/recall, logits for IS; comparable to "
            "Inception FID/IS published for the same data, resolution and number of samples",
            _layers(FeatureExtractorInceptionV3), reason=reason,
        )
    else:
        if (choice == "self-supervised") != self_supervised and choice != "auto":
            learned = "rotations, without labels" if self_supervised else "the labels"
            raise ValueError(f"features={choice!r}, but the features classifier learned {learned}")
        extractor = _domain_extractor(choice, domain_checkpoint, storage_options, self_supervised, reason)
    if reason:
        LOG.info(f"features=auto: using the {extractor.kind} extractor ({extractor.name}) because {reason}")
    return extractor


def inception_weights_for(choice: str, configured: str | None, images: ImageKind | None, labelled: bool) -> str:
    """The checked local Inception weights file for `choice`: `configured`, or torch-fidelity's
    cached file, fetched once where missing; a one-line error naming the file and the URL where not."""
    return inception_weights(choice, configured, _alternatives(images, labelled))


def _domain_extractor(choice: str, checkpoint: str | None, storage_options: dict[str, Any] | None,
                      self_supervised: bool, reason: str | None) -> Extractor:
    if checkpoint is None:
        hint = f"{reason} and " if reason else ""
        raise ValueError(f"features={choice!r}: {hint}no domain_checkpoint given; pass the model.pt URL of the "
                         "pipeline's 'features' classifier (tasks.stages.train_classifier, role 'features')")
    if not exists(checkpoint, storage_options):
        raise FileNotFoundError(f"{redact(checkpoint)}: the features classifier's checkpoint does not exist; "
                                "train it first (stage train-classifiers, role 'features')")
    register_domain_extractor()
    fallback = f"{reason}; " if reason else ""
    if self_supervised:
        return Extractor(
            choice, "self-supervised", DOMAIN_EXTRACTOR, checkpoint,
            f"{fallback}self-supervised features (the pipeline's 'features' ResNet, trained without labels on the "
            f"real train split to tell which quarter turn an image was given) from {redact(checkpoint)}: "
            "penultimate-layer features for FID, KID and precision/recall; no IS (it needs class logits). Comparable "
            "only to other self-supervised FIDs of this pipeline on the same data, never to Inception or domain FIDs",
            _layers(DomainFeatureExtractor), storage_options, reason,
        )
    return Extractor(
        choice, "domain", DOMAIN_EXTRACTOR, checkpoint,
        f"{fallback}domain classifier (the pipeline's 'features' ResNet, trained on the real train split) from "
        f"{redact(checkpoint)}: penultimate-layer features for FID, KID and precision/recall; IS from its logits, "
        "so IS measures that classifier's confidence and class diversity (at most the number of classes). "
        "Not comparable to Inception FID/IS published elsewhere",
        _layers(DomainFeatureExtractor), storage_options, reason,
    )


@contextlib.contextmanager
def _local_weights(extractor: Extractor) -> Iterator[str]:
    """A local file torch-fidelity can open: inception weights are one already; the
    domain checkpoint (any URL, S3 included) is checked and copied to a private temp file."""
    if extractor.kind == "inception":
        yield extractor.weights
        return
    checkpoint = load_checkpoint(extractor.weights, extractor.storage_options)
    with tempfile.TemporaryDirectory(prefix="vqvae2-fidelity-") as folder:
        path = os.path.join(folder, "features-classifier.pt")
        torch.save(checkpoint, path)
        yield path


def kid_subset_size_for(num_generated: int, num_reference: int, requested: int | None = None) -> int:
    """KID's subset size: `requested`, or torch-fidelity's 1000 capped at the smaller set."""
    smaller = min(num_generated, num_reference)
    size = min(KID_SUBSET_SIZE, smaller) if requested is None else requested
    if not 2 <= size <= smaller:
        raise ValueError(f"kid_subset_size must be in [2, {smaller}] (the smaller set has {smaller} images), "
                         f"got {size}")
    return size


def isc_splits_for(num_generated: int) -> int:
    return max(1, min(ISC_SPLITS, num_generated // ISC_MIN_SPLIT))


def fidelity_metrics(generated: FidelityImages | Tensor | np.ndarray, reference: FidelityImages | Tensor | np.ndarray,
                     extractor: Extractor, *, kid_subset_size: int | None = None, isc: bool = True, prc: bool = True,
                     device: torch.device | str | None = None, batch_size: int = 128,
                     reference_cache: str | None = None) -> dict[str, float]:
    """FID, KID, precision/recall (and IS) of `generated` against `reference` (real images).

    Images: uint8 (N, C, H, W) or `FidelityImages`. Returns `fid`, `kid_mean`, `kid_std`,
    `kid_subset_size`, `num_generated`, `num_reference`, with `prc`: `precision` (the share
    of generated images inside the real manifold), `recall` (the reverse), `f_score`, and
    with `isc`: `isc_mean`, `isc_std`, `isc_splits` (of the generated set alone). CUDA when
    available unless `device` says otherwise. Nothing is cached on disk unless
    `reference_cache` names a folder: there torch-fidelity keeps the reference's features
    for later calls with the same reference and extractor (see `fidelity_table`).
    """
    generated = generated if isinstance(generated, FidelityImages) else FidelityImages(generated)
    reference = reference if isinstance(reference, FidelityImages) else FidelityImages(reference)
    n_gen, n_ref = len(generated), len(reference)
    smallest = MIN_IMAGES if prc else 2  # covariances need two
    if min(n_gen, n_ref) < smallest:
        raise ValueError(f"fidelity metrics need at least {smallest} images per set, got {n_gen} generated and "
                         f"{n_ref} reference images")
    subset = kid_subset_size_for(n_gen, n_ref, kid_subset_size)
    splits = isc_splits_for(n_gen)
    isc = isc and extractor.kind != "self-supervised"  # rotation logits are no class posterior
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if extractor.kind != "inception":
        register_domain_extractor()  # this process may not be the one that resolved the extractor
    layers = extractor.feature_layers
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with _local_weights(extractor) as weights, on_device:
        raw = torch_fidelity.calculate_metrics(
            input1=generated, input2=reference,  # torch-fidelity's convention: input1 generated, input2 real
            fid=True, kid=True, prc=prc, isc=isc, feature_extractor=extractor.name,
            feature_layer_fid=layers["fid"], feature_layer_kid=layers["kid"], feature_layer_prc=layers["prc"],
            feature_layer_isc=layers["isc"], feature_extractor_weights_path=weights,
            kid_subset_size=subset, isc_splits=splits, prc_neighborhood=PRC_NEIGHBORHOOD,
            cuda=device.type == "cuda", batch_size=batch_size, verbose=False,
            # Only input2 is named, so only the reference's features and statistics are cached.
            cache=reference_cache is not None, cache_root=reference_cache,
            input2_cache_name="reference" if reference_cache is not None else None,
            # No DataLoader worker processes: the images are already in memory, workers would
            # only copy them (and fork a threaded Prefect worker). It also computes
            # precision/recall in blocks. Same numbers either way, less memory.
            save_cpu_ram=True,
        )
    metrics: dict[str, float] = {
        "fid": raw[torch_fidelity.KEY_METRIC_FID],
        "kid_mean": raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": raw[torch_fidelity.KEY_METRIC_KID_STD],
        "kid_subset_size": subset, "num_generated": n_gen, "num_reference": n_ref,
    }
    if prc:
        metrics |= {"precision": raw[torch_fidelity.KEY_METRIC_PRECISION],
                    "recall": raw[torch_fidelity.KEY_METRIC_RECALL], "f_score": raw[torch_fidelity.KEY_METRIC_F_SCORE]}
    if isc:
        metrics |= {"isc_mean": raw[torch_fidelity.KEY_METRIC_ISC_MEAN],
                    "isc_std": raw[torch_fidelity.KEY_METRIC_ISC_STD], "isc_splits": splits}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"torch-fidelity returned non-finite {bad} ({extractor.name}, {n_gen} generated, "
                                 f"{n_ref} reference images)")
    return metrics


PER_CLASS_MIN = 10  # images a class needs on each side before its FID estimates anything


def per_class_fid(generated: Tensor, generated_labels: Tensor, reference: Tensor, reference_labels: Tensor,
                  classes: Mapping[int, str], extractor: Extractor) -> list[dict[str, Any]]:
    """The FID of each class's generated images against the real images of that class, in
    `extractor`'s feature space, with the count on each side. A class with fewer than
    `PER_CLASS_MIN` images on either side is listed with its counts and no FID: a covariance
    of a few dozen features from fewer images says nothing."""
    rows = []
    for label, name in classes.items():
        mine, real = generated[generated_labels == label], reference[reference_labels == label]
        row: dict[str, Any] = {"class": label, "name": name, "samples": len(mine), "reference": len(real), "fid": None}
        if min(len(mine), len(real)) >= PER_CLASS_MIN:
            row["fid"] = fidelity_metrics(mine, real, extractor, prc=False, isc=False)["fid"]
        rows.append(row)
    return rows


def fidelity_table(sets: Mapping[str, FidelityImages | Tensor | np.ndarray],
                   reference: FidelityImages | Tensor | np.ndarray, extractor: Extractor,
                   **options: Any) -> dict[str, dict[str, float]]:
    """`fidelity_metrics` of every named set against one reference, whose features are
    extracted once, not once per set (torch-fidelity's cache, in a private temporary folder
    that goes away with the call)."""
    with tempfile.TemporaryDirectory(prefix="vqvae2-fidelity-reference-") as cache:
        return {name: fidelity_metrics(images, reference, extractor, reference_cache=cache, **options)
                for name, images in sets.items()}


# --- the feature space a config measures in -----------------------------------------------------


def feature_space(config: PipelineConfig) -> str:
    """The feature space the evaluation will use: inception, domain (a classifier of the
    labels) or self-supervised (a rotation predictor, for an unconditional model). Read from
    the config alone, as `resolve_extractor` decides `auto` (`auto_features`): it decides which
    classifiers train, so their keys, which a machine's cache must never change."""
    choice = config.evaluate.features
    if choice == "auto":
        return auto_features(config.evaluate.inception_weights, ImageKind.of(config.model))[0]
    return choice


def check_features_available(config: PipelineConfig, classes_known: bool = True) -> None:
    """Evaluation must be possible before anything trains: Inception's weights on this
    machine when the feature space is inception, labels when it is domain (once the model's
    classes are known: `classes_known`)."""
    evaluate, space = config.evaluate, feature_space(config)
    if classes_known and space == "domain" and not config.model.num_classes:
        raise ValueError("evaluate.features is 'domain', but the model is unconditional (num_classes=0): the domain "
                         "features are a classifier of the labels; choose 'self-supervised', 'inception' or 'auto'")
    if space == "inception":
        # Fetched here rather than at the evaluation: an unreachable URL or a bad file fails
        # before hours of training, and the evaluation (and the check after the ingest) find
        # the file in the cache. The cache is torch-fidelity's, never an artifact of the run.
        images = ImageKind.of(config.model)
        inception_weights_for(evaluate.features, evaluate.inception_weights, images, images.labelled)
