"""Stage 3: encode every shard of the dataset into Zarr code arrays (one mapped task per
shard, each writing its own chunk-aligned rows), then mark the codes complete.

Encoding is per image and deterministic, so the batch size (`encode.batch_size`, a
runtime setting) changes only the speed: the codes' key is their inputs' keys alone."""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch
from prefect import unmapped
from torch.utils.data import DataLoader

from storage.codes import CodeDataset, codes_damage, create_codes, finish_codes, write_codes
from storage.loader import iter_shard_batches
from storage.shards import shard_unit

from ..config import PipelineConfig, Runtime
from ..manifests import Manifest, Record, RootURL
from ..machinery.artifacts import Artifact, Marker
from ..machinery.cached import cached_unit, with_records
from ..machinery.devices import resolve_device
from ..machinery.models import load_model
from ..machinery.reporting import logger, track
from ..stage import Needs, Settings, Stage, stage_task

if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
    from .ingest import DatasetManifest
    from .train_autoencoder import AutoencoderManifest


class EncodedShard(Record):
    split: str
    index: int
    rows: int
    offset: int
    # storage.codes.CodesRecord: chunk object key -> (size, sha256) as write_codes wrote
    # it; a resumed encoding checks it before reusing the shard. None in markers written
    # before it was kept: those are trusted as before (their rows cannot be checked, and
    # encoding every finished shard of an interrupted run again would cost more than the
    # damage it might find; finish_codes still finds rows never written).
    chunks: dict[str, tuple[int, str]] | None = None


class CodesManifest(Manifest):
    codes: RootURL  # codes.zarr
    dataset: str
    autoencoder: str
    level_shapes: list[tuple[int, int]]
    rows: dict[str, int]
    codebook_size: int
    class_names: list[str]

    def validation_batches(self, storage_options: dict[str, Any] | None, rows: int, batch_size: int) -> DataLoader:
        """The first `rows` rows of the test split, in order, as CodeDataset batches: what the
        priors are measured on, while they train and in the report."""
        dataset = CodeDataset(self.codes, "test", storage_options=storage_options)
        indices = range(min(rows, len(dataset)))
        return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size)


class EncodeSettings(Settings):
    """Nothing of the config decides the codes but the dataset and the autoencoder."""

    @classmethod
    def of(cls, config: PipelineConfig, variant: Any = None) -> EncodeSettings:
        return cls()


def run(settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
        autoencoder: AutoencoderManifest) -> CodesManifest:
    records = runtime.root, runtime.storage_options
    with_records(prepare_codes, *records)(settings, runtime, dataset, autoencoder)
    encoded = with_records(encode_shard, *records).map(dataset.shard_units(), unmapped(settings), unmapped(runtime),
                                                       unmapped(dataset), unmapped(autoencoder))
    return with_records(finalize_codes, *records)(settings, runtime, dataset, autoencoder,
                                                  track(encoded, "encode: shards encoded"))


STAGE = Stage(
    name="encode", directory="codes", code_version="1", settings=EncodeSettings, output=CodesManifest,
    inputs={"dataset": Needs("ingest"), "autoencoder": Needs("train-autoencoder")}, run=run,
    summary="Encode the dataset with a trained autoencoder (mapped per shard).",
)


def _codes(settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
           autoencoder: AutoencoderManifest) -> Artifact:
    return STAGE.artifact(settings, {"dataset": dataset, "autoencoder": autoencoder}, runtime)


ARRAYS = "codes.zarr"  # the arrays' folder in the artifact


def codes_url(artifact: Artifact) -> str:
    return artifact.path(ARRAYS)


def _arrays_marker(settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
                   autoencoder: AutoencoderManifest) -> Marker[str]:
    # The arrays exist once the codes are complete; before that, creating them again is
    # cheap and idempotent, so only a complete artifact counts as done.
    codes = _codes(settings, runtime, dataset, autoencoder)
    return Marker(url=codes_url(codes), record=codes.record("arrays"),
                  read=lambda: ARRAYS if codes.read(CodesManifest) else None)


@cached_unit(locate=_arrays_marker, name="prepare-codes")
def prepare_codes(settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
                  autoencoder: AutoencoderManifest) -> str:
    """Create the (empty) code arrays once, before the per-shard writers; a retry finds them.
    Returns their folder's name in the artifact (a name, not a URL: Prefect keeps it under the root)."""
    codes = _codes(settings, runtime, dataset, autoencoder)
    create_codes(
        codes_url(codes), dataset.shard_counts(), [list(shape) for shape in autoencoder.latent_shapes],
        class_names=dataset.class_names, attrs={"dataset": dataset.key, "autoencoder": autoencoder.key},
        storage_options=codes.storage_options,
    )
    return ARRAYS


def _shard_marker(unit: tuple[str, int], settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
                  autoencoder: AutoencoderManifest) -> Marker[EncodedShard]:
    split, index = unit
    codes = _codes(settings, runtime, dataset, autoencoder)
    marker = codes.unit_marker(shard_unit(split, index), EncodedShard)
    read = functools.partial(_intact_shard, marker, codes)
    # Complete codes are trusted whole (the manifest is written last): reading every chunk
    # back to check its digest is for resuming an unfinished encoding, never for a cached re-run.
    return dataclasses.replace(marker, read=read, done=lambda: codes.is_complete() or read() is not None)


def _intact_shard(marker: Marker[EncodedShard], codes: Artifact) -> EncodedShard | None:
    return _intact(marker.read(), codes)


def _intact(shard: EncodedShard | None, codes: Artifact) -> EncodedShard | None:
    """A shard's marker while its rows still match their record; None (encode it again) once not."""
    if shard is None or shard.chunks is None:  # not done, or a marker from before records were kept
        return shard
    damage = codes_damage(codes_url(codes), shard.split, shard.offset, shard.rows, shard.chunks, codes.storage_options)
    if damage is None:
        return shard
    logger().warning(f"{damage}: encoding shard {shard.index} of {shard.split!r} again")
    return None


@cached_unit(locate=_shard_marker, name="encode-shard", task_run_name="encode-{unit[0]}-{unit[1]}")
def encode_shard(unit: tuple[str, int], settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
                 autoencoder: AutoencoderManifest) -> EncodedShard:
    """Encode one shard into its rows of the arrays (its marker is written after them)."""
    split, index = unit
    codes = _codes(settings, runtime, dataset, autoencoder)
    device = resolve_device(runtime.training.device)
    model = load_model(autoencoder, codes.storage_options, device)
    levels: list[list[torch.Tensor]] = []
    labels, keys = [], []
    for images, batch_labels, batch_keys in iter_shard_batches(dataset.url, split, index, runtime.encode.batch_size,
                                                               runtime.storage_options):
        batch_codes = model.encode(images.to(device))
        levels = levels or [[] for _ in batch_codes]
        for store, level_codes in zip(levels, batch_codes):
            store.append(level_codes.cpu())
        labels.append(batch_labels)
        keys += batch_keys
    offset = dataset.splits[split].shards[index].offset
    chunks = write_codes(codes_url(codes), split, offset, [torch.cat(level) for level in levels], torch.cat(labels),
                         keys, codes.storage_options)
    return EncodedShard(split=split, index=index, rows=len(keys), offset=offset, chunks=chunks)


def _chunk_digests(params: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """The chunk objects' sizes and SHA-256 as their writers recorded them: not read again for the inventory."""
    return {f"{ARRAYS}/{key}": (size, digest) for shard in params["shards"] for key, (size, digest)
            in (shard.chunks or {}).items()}


@stage_task(STAGE, name="finalize-codes", known_files=_chunk_digests)
def finalize_codes(settings: EncodeSettings, runtime: Runtime, dataset: DatasetManifest,
                   autoencoder: AutoencoderManifest, shards: list[EncodedShard], artifact: Artifact) -> CodesManifest:
    """Check every row was written, mark the arrays complete, record the layout."""
    info = finish_codes(codes_url(artifact), artifact.storage_options)
    rows = {split: v["num_rows"] for split, v in info["splits"].items()}
    logger().info(f"codes complete: {rows} rows per split")
    return CodesManifest(
        **artifact.identity(), codes=codes_url(artifact), dataset=dataset.key, autoencoder=autoencoder.key,
        level_shapes=info["level_shapes"], rows=rows, codebook_size=autoencoder.codebook_size,
        class_names=dataset.class_names,
    )
