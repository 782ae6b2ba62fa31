"""TarSource on img2dataset's webdataset output: labels from .json, unlabelled tars, skips with reasons, growth.

The tars are laid out as img2dataset writes them (``00000.tar`` with ``{key}.jpg|png|webp``,
``{key}.txt``, ``{key}.json``; ``00000.parquet`` and ``00000_stats.json`` beside them), on a
local disk and on the moto S3 server. The ``label`` field of the .json is an extra input
column, which img2dataset copies into each sample's .json (``save_additional_columns``).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.fsutil import filesystem
from storage.ingest import IngestConfig, ingest
from storage.shards import iter_samples
from storage.sources import Partition, TarSource
from image_files import tar_bytes

CLASSES = ("cat", "dog")
FORMATS = {"00000": "jpg", "00001": "png", "00002": "webp"}  # img2dataset's encode_format, one per tar here
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Label values of the good samples per tar (names, ints and digit strings, as CSV columns become), and its bad sample.
GOOD = {"00000": ["cat", "dog", "cat"], "00001": [1, "0", "dog"], "00002": ["dog", "dog", "cat"]}
BAD = {
    "00000": ("no_image", r"no image member \(has: json, txt\)"),
    "00001": ("bad_json", r"sample 000010003: its \.json does not parse"),
    "00002": ("zebra", r"sample 000020003: \.json field 'label' is 'zebra', not a class index or one of class_names"),
}


def _image(ext: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (10, 14, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, PIL_FORMATS[ext])
    return out.getvalue()


def _meta(key: str, label, ext: str) -> bytes:
    """A sample's .json as img2dataset writes it, plus the extra ``label`` column."""
    return json.dumps({
        "url": f"https://example.com/{key}.{ext}", "key": key, "status": "success", "error_message": None,
        "caption": f"a photo {key}", "width": 14, "height": 10, "original_width": 28, "original_height": 20,
        "exif": "{}", "sha256": "0" * 64, "label": label,
    }).encode()  # fmt: skip


def _shard(shard: str, labels: list, ext: str, bad: str | None = None) -> bytes:
    members = []
    for i, label in enumerate(labels):
        key = f"{shard}{i:04d}"
        members += [(f"{key}.{ext}", _image(ext, int(key))), (f"{key}.txt", b"a caption")]
        members += [(f"{key}.json", _meta(key, label, ext))]
    key = f"{shard}{len(labels):04d}"
    if bad == "no_image":  # img2dataset never writes this, but a hand-edited tar may hold it
        members += [(f"{key}.txt", b"a caption"), (f"{key}.json", _meta(key, "cat", ext))]
    elif bad == "bad_json":
        members += [(f"{key}.{ext}", _image(ext, 1)), (f"{key}.txt", b"x"), (f"{key}.json", b'{"label": "cat",')]
    elif bad == "zebra":
        members += [(f"{key}.{ext}", _image(ext, 2)), (f"{key}.txt", b"x"), (f"{key}.json", _meta(key, "zebra", ext))]
    return tar_bytes(members)


def _put(files: dict[str, bytes], options: dict | None) -> None:
    """Write ``{url: bytes}`` through a filesystem of its own, as another process (img2dataset) would."""
    fs, _ = filesystem(next(iter(files)), {**options, "skip_instance_cache": True} if options else None)
    paths = {filesystem(url, options)[1]: data for url, data in files.items()}
    if "://" not in next(iter(files)):
        for path in paths:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    fs.pipe(paths)


def _img2dataset_output(root: str, options: dict | None, shards=FORMATS) -> None:
    files = {}
    for shard, ext in shards.items():
        files[f"{root}/{shard}.tar"] = _shard(shard, GOOD[shard], ext, BAD[shard][0])
        files[f"{root}/{shard}.parquet"] = b"PAR1 not a sample PAR1"
        files[f"{root}/{shard}_stats.json"] = json.dumps({"count": 4, "successes": 4}).encode()
    _put(files, options)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[str, dict | None]:
    """``(folder URL, storage_options)`` of the img2dataset output: a local disk or the moto S3 server."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket.url}/laion", bucket.storage_options
    return str(tmp_path / "laion"), None


def _expected_counts(units: list) -> list[int]:
    counts = [0, 0]
    for url, _ in units:
        for label in GOOD[url.rsplit("/", 1)[-1][:-4]]:
            counts[CLASSES.index(label) if label in CLASSES else int(label)] += 1
    return counts


def test_img2dataset_tars_ingest_with_json_labels(where, tmp_path):
    root, options = where
    _img2dataset_output(root, options)
    source = TarSource(f"{root}/*.tar", class_names=CLASSES, storage_options=options, label="json:label")
    config = IngestConfig(image_size=8, mode="RGB", holdout_fraction=0.34, max_bad_fraction=0.5)
    units = source.partition(config).units
    names = sorted(url.rsplit("/", 1)[-1] for split_units in units.values() for url, _ in split_units)
    assert names == ["00000.tar", "00001.tar", "00002.tar"]  # no .parquet, no _stats.json
    assert set(units) == {"train", "test"}

    dataset = f"{root}/ds" if options else str(tmp_path / "ds")
    manifest = ingest(source, dataset, config, storage_options=options)
    assert manifest["class_names"] == list(CLASSES) and manifest["source"]["label"] == "json:label"
    assert manifest["num_samples"] == 9 and manifest["num_skipped"] == 3 and manifest["ignored"] == []
    for split, split_units in units.items():
        info = manifest["splits"][split]
        assert info["class_counts"] == _expected_counts(split_units)
        assert len(info["shards"]) == len(split_units)  # one output shard per tar
    skipped = {s["ref"]: s["reason"] for info in manifest["splits"].values() for s in info["skipped"]}
    assert sorted(skipped) == [f"{root}/{shard}.tar#{shard}0003" for shard in FORMATS]
    for shard, (_, reason) in BAD.items():
        assert re.search(reason, skipped[f"{root}/{shard}.tar#{shard}0003"]), skipped
    first = next(iter_samples(f"{dataset}/train/shard-000000.tar", options))
    assert Image.open(io.BytesIO(first["png"])).size == (8, 8)


def test_unlabelled_img2dataset_tars_read_no_json(where, tmp_path):
    root, options = where
    _img2dataset_output(root, options)
    source = TarSource(f"{root}/*.tar", storage_options=options, label=None)
    partition = source.partition(IngestConfig(holdout_fraction=0))
    assert isinstance(partition, Partition) and partition.class_names == ()
    with source.open() as reader:
        items = [item for unit in partition.units["train"] for item in reader.read("train", unit)]
    # The broken .json and the unknown label do not matter when no label is read; a missing image still does.
    assert [item.label for item in items] == [0] * 12
    assert [item.ref for item in items if item.error] == [f"{root}/00000.tar#000000003"]

    dataset = f"{root}/ds" if options else str(tmp_path / "ds")
    config = IngestConfig(image_size=8, holdout_fraction=0, max_bad_fraction=0.2)
    manifest = ingest(source, dataset, config, storage_options=options)
    assert manifest["class_names"] == [] and manifest["num_samples"] == 11 and manifest["num_skipped"] == 1
    assert manifest["source"]["label"] is None


def test_grown_tar_set_keeps_earlier_units_first_and_in_their_split(where):
    root, options = where
    _img2dataset_output(root, options)
    source = TarSource(f"{root}/*.tar", class_names=CLASSES, storage_options=options, label="json:label")
    config = IngestConfig(holdout_fraction=0.34)
    before = source.partition(config).units
    base = json.loads(json.dumps(before))  # as a dataset's records give it back: lists
    digest = source.digest()

    _put({f"{root}/00003.tar": _shard("00003", ["dog", "cat"], "jpg")}, options)
    after = source.partition(config, base).units
    for split, units in base.items():
        assert after[split][: len(units)] == [tuple(u) for u in units]  # unchanged tars first, in the base's order
    new = [(s, i) for s, units in after.items() for i, (url, _) in enumerate(units) if url.endswith("00003.tar")]
    assert len(new) == 1 and new[0][1] == len(after[new[0][0]]) - 1  # the new tar comes last
    assert source.digest() != digest
    # Without a base the split of a tar still depends on its name only: none of the three moves.
    fresh = source.partition(config).units
    assert {u for s in before for u in before[s]} <= {u for s in fresh for u in fresh[s]}
    assert all(tuple(u) in fresh[s] for s in before for u in before[s])

    _put({f"{root}/00001.tar": _shard("00001", [1, "0"], "png")}, options)  # rewritten: fewer samples
    changed = source.partition(config, base).units
    split = next(s for s, units in before.items() if any(u.endswith("00001.tar") for u, _ in units))
    kept = [tuple(u) for u in base[split] if not u[0].endswith("00001.tar")]
    assert changed[split][: len(kept)] == kept  # the other base tars keep their place
    rewritten = [u for u in changed[split][len(kept) :] if u[0].endswith("00001.tar")]
    assert len(rewritten) == 1 and rewritten[0] not in before[split]  # after them, with its new fingerprint


def test_grown_tar_set_ingests_only_the_new_tar(tmp_path):
    root = str(tmp_path / "laion")
    _img2dataset_output(root, None)
    source = TarSource(f"{root}/*.tar", class_names=CLASSES, label="json:label")
    config = IngestConfig(image_size=8, holdout_fraction=0, max_bad_fraction=0.5)
    first = ingest(source, str(tmp_path / "ds1"), config)
    _put({f"{root}/00003.tar": _shard("00003", ["dog", "cat"], "jpg")}, None)
    second = ingest(source, str(tmp_path / "ds2"), config, base=str(tmp_path / "ds1"))
    assert second["num_samples"] == first["num_samples"] + 2 and second["carried"] == first["num_samples"]
    assert second["splits"]["train"]["shards"][:3] == first["splits"]["train"]["shards"]


def test_json_label_values(tmp_path):
    values = [3, "2", "dog", True, -1, 7, None, "zebra", {"a": 1}]
    members = [(f"k{i}.png", _image("png", i)) for i in range(len(values))]
    members += [(f"k{i}.json", json.dumps({"label": v}).encode()) for i, v in enumerate(values)]
    members.sort(key=lambda m: m[0].split(".")[0])  # a sample's members lie together
    members += [("k9.png", _image("png", 9)), ("k9.json", b"[1, 2]"), ("k10.png", _image("png", 10))]
    (tmp_path / "t.tar").write_bytes(tar_bytes(members))

    def read(class_names):
        source = TarSource(str(tmp_path / "t.tar"), class_names=class_names, label="json:label")
        with source.open() as reader:
            return [(item.label, item.error) for item in reader.read("train", [str(tmp_path / "t.tar"), "any"])]

    named = read(("cat", "dog", "owl", "bee", "ant"))
    assert [label for label, error in named if error is None] == [3, 2, 1]
    errors = [error for _, error in named if error]
    assert errors[0] == "sample k3: .json field 'label' is True, not a class index or one of class_names"
    assert errors[1] == "sample k4: .json field 'label' is -1, outside the 5 class_names"
    assert errors[2] == "sample k5: .json field 'label' is 7, outside the 5 class_names"
    assert errors[3].startswith("sample k6: .json field 'label' is None") and "'zebra'" in errors[4]
    assert errors[6:] == [
        "sample k9: its .json has no label field 'label'",
        "sample k10: no .json member to read the label field 'label' from",
    ]

    unnamed = read(None)
    assert [label for label, error in unnamed if error is None] == [3, 2, 7]
    message = "sample k2: .json field 'label' is 'dog', not a class index (set class_names for names)"
    assert message in [error for _, error in unnamed]


def test_label_is_validated_and_part_of_the_identity(tmp_path):
    for bad in ("json:", "json", "txt", 3):
        with pytest.raises(ValueError, match=r"TarSource.label must be 'cls'.*'json:FIELD'.*None"):
            TarSource("x/*.tar", label=bad)
    with pytest.raises(ValueError, match=r"class_names needs a label"):
        TarSource("x/*.tar", class_names=("a",), label=None)
    with pytest.raises(ValueError, match=r"distinct strings"):
        TarSource("x/*.tar", class_names=["a", "a"], label="json:label")
    assert TarSource("x", class_names=["a", "b"]).class_names == ("a", "b")  # from JSON

    _img2dataset_output(str(tmp_path), None, {"00000": "jpg"})
    digests = {TarSource(str(tmp_path / "*.tar"), label=label).digest() for label in ("cls", "json:label", None)}
    assert len(digests) == 3
    assert TarSource(str(tmp_path / "*.tar"), label="json:label").describe()["label"] == "json:label"


def test_crafted_members_and_huge_labels_are_counted_skips_never_read(tmp_path, monkeypatch):
    import storage.shards

    monkeypatch.setattr(storage.shards, "MAX_MEMBER_BYTES", 4096)
    good = [(f"s{i}.png", _image("png", i)) for i in range(5)]
    members = good + [("../escape.png", _image("png", 7)), ("/etc/abs.png", _image("png", 8)),
                      ("big.png", _image("png", 9) + bytes(8192)), ("huge.png", _image("png", 10)),
                      ("huge.cls", b"1000000000")]
    (tmp_path / "crafted.tar").write_bytes(tar_bytes(members))
    config = IngestConfig(image_size=8, mode="RGB", holdout_fraction=0, max_bad_fraction=0.9)
    manifest = ingest(TarSource(str(tmp_path / "crafted.tar")), str(tmp_path / "ds"), config)
    assert manifest["num_samples"] == 5 and len(manifest["class_names"]) == 1  # all good ones are class 0
    reasons = {s["ref"].rsplit("#", 1)[1]: s["reason"] for s in manifest["splits"]["train"]["skipped"]}
    assert reasons == {
        "../escape": "member '../escape.png' has an absolute or '..' name",
        "/etc/abs": "member '/etc/abs.png' has an absolute or '..' name",
        "big": f"member 'big.png' has {len(_image('png', 9)) + 8192} bytes, more than the 4096 an image file may "
               "have (MAX_MEMBER_BYTES)",
        "huge": "label 1000000000, more than 100000 classes; give the source its class_names",
    }
