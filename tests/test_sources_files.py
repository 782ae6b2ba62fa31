"""Bring your own data: image folders (labelled or not) and list files (CSV, JSON Lines, Parquet),
with real image files in every format a user has, on a local disk and on S3 (moto)."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from storage.fsutil import filesystem
from storage.ingest import IngestConfig, ingest
from storage.sources import FileItem, ImageFolderSource, ListSource, source_digest

FORMATS = ("png", "jpg", "webp", "png16")


def _image(path, kind: str, seed: int = 0) -> None:
    """A small real image file: 8-bit RGB PNG, JPEG, WebP, or 16-bit gray PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "png16":
        Image.fromarray(rng.integers(0, 65535, (12, 10), dtype=np.uint16)).save(path, format="PNG")
    else:
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[kind]
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path, format=fmt)


def _images(folder, names) -> list[str]:
    """Write one image per name (formats cycling through FORMATS); return the names."""
    for i, name in enumerate(names):
        _image(folder / name, FORMATS[i % len(FORMATS)], seed=i)
    return list(names)


def _name(i: int) -> str:
    return f"{i:03d}." + ("png", "jpg", "webp", "png")[i % 4]


def _corrupt(path) -> None:
    _image(path, "png")
    path.write_bytes(path.read_bytes()[:30])


def _refs(partition, split=None) -> list[str]:
    splits = [split] if split else sorted(partition.units)
    return [item.ref for s in splits for unit in partition.units.get(s, ()) for item in unit]


def _labels(partition) -> dict[str, int]:
    return {item.ref: item.label for units in partition.units.values() for unit in units for item in unit}


def _read(source, partition) -> dict[str, tuple[int, bytes | None, str | None]]:
    """Every item the reader yields, units given back as JSON gives them (lists)."""
    out = {}
    with source.open() as reader:
        for split, units in partition.units.items():
            for unit in json.loads(json.dumps(units)):
                for item in reader.read(split, unit):
                    out[item.ref] = (item.label, item.data, item.error)
    return out


# --- image folders ------------------------------------------------------------------------


def test_flat_folder_is_unlabelled_with_every_image(tmp_path):
    root = tmp_path / "flat"
    names = _images(root, [_name(i) for i in range(11)])
    _corrupt(root / "broken.png")
    (root / "README.txt").write_text("about these images")
    (root / ".DS_Store").write_bytes(b"hidden")
    source = ImageFolderSource(str(root))
    partition = source.partition(IngestConfig(shard_size=4, holdout_fraction=0.25))

    assert partition.class_names == ()
    assert sorted(_refs(partition)) == sorted(names + ["broken.png"])
    assert set(_labels(partition).values()) == {0}
    assert partition.ignored == (("README.txt", "not an image file"),)
    assert all(len(unit) <= 4 for units in partition.units.values() for unit in units)
    assert 1 <= len(_refs(partition, "test")) <= 6
    read = _read(source, partition)
    assert read["003.png"] == (0, (root / "003.png").read_bytes(), None)  # a 16-bit PNG, bytes as they are
    assert read["broken.png"][1] == (root / "broken.png").read_bytes()  # decoding (and skipping) is ingest's job
    assert source.describe() == {"kind": "image_folder", "url": str(root), "labels": "auto"}


def test_unlabelled_folder_ingests_every_format_and_skips_the_corrupt_file(tmp_path):
    root = tmp_path / "flat"
    _images(root, [_name(i) for i in range(12)])
    _corrupt(root / "broken.png")
    config = IngestConfig(image_size=8, mode="RGB", shard_size=5, max_bad_fraction=0.1, holdout_fraction=0.2)
    manifest = ingest(ImageFolderSource(str(root)), str(tmp_path / "ds"), config)
    assert manifest["num_samples"] == 12 and manifest["num_skipped"] == 1
    skipped = [s for split in manifest["splits"].values() for s in split["skipped"]]
    assert [s["ref"] for s in skipped] == ["broken.png"] and skipped[0]["reason"].startswith("not an image")
    assert manifest["class_names"] == []


def test_none_labels_take_images_at_any_depth(tmp_path):
    root = tmp_path / "ffhq"
    names = _images(root, [f"00000/{i:05d}.png" for i in range(6)] + [f"01000/{i:05d}.jpg" for i in range(1000, 1005)])
    names += _images(root, ["01000/extra/x.webp"])
    (root / "LICENSE.txt").write_text("terms")
    (root / "00000" / "meta.json").write_text("{}")
    partition = ImageFolderSource(str(root), labels="none").partition(IngestConfig(shard_size=5))
    assert partition.class_names == ()
    assert sorted(_refs(partition)) == sorted(names) and len(names) == 12
    assert sorted(partition.ignored) == [("00000/meta.json", "not an image file"), ("LICENSE.txt", "not an image file")]

    as_classes = ImageFolderSource(str(root), labels="auto").partition(IngestConfig(shard_size=5))  # nested: folders
    assert as_classes.class_names == ("00000", "01000")
    assert _labels(as_classes)["01000/extra/x.webp"] == 1 and _labels(as_classes)["00000/00003.png"] == 0


def test_auto_detects_flat_class_mixed_and_presplit_layouts(tmp_path):
    config = IngestConfig(shard_size=100)
    flat = tmp_path / "flat"
    _images(flat, ["a.png", "b.jpg"])
    assert ImageFolderSource(str(flat)).partition(config).class_names == ()

    classes = tmp_path / "classes"
    _images(classes, ["cat/1.png", "cat/2.png", "dog/1.jpg"])
    partition = ImageFolderSource(str(classes)).partition(config)
    assert partition.class_names == ("cat", "dog")
    assert _labels(partition) == {"cat/1.png": 0, "cat/2.png": 0, "dog/1.jpg": 1}

    mixed = tmp_path / "mixed"
    _images(mixed, ["cat/1.png", "dog/1.png", "stray.png"])
    partition = ImageFolderSource(str(mixed)).partition(config)
    assert partition.class_names == ("cat", "dog")
    assert partition.ignored == (("stray.png", "not inside a class folder"),)

    presplit = tmp_path / "presplit"
    _images(presplit, ["train/a.png", "train/b.png", "train/c.png", "test/d.png"])
    partition = ImageFolderSource(str(presplit)).partition(config)
    assert partition.class_names == ()
    assert sorted(_refs(partition, "train")) == ["train/a.png", "train/b.png", "train/c.png"]
    assert _refs(partition, "test") == ["test/d.png"]


def test_wrong_labels_and_empty_folders_fail_naming_the_field_or_url(tmp_path):
    flat = tmp_path / "flat"
    _images(flat, ["a.png", "b.png"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(flat))}: no class folders.*labels='none'"):
        ImageFolderSource(str(flat), labels="folders").partition(IngestConfig())
    with pytest.raises(ValueError, match=r"ImageFolderSource\.labels must be one of 'auto', 'folders', 'none'"):
        ImageFolderSource(str(flat), labels="classes")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))}: no image files"):
        ImageFolderSource(str(empty), labels="none").partition(IngestConfig())
    assert ImageFolderSource(str(flat), labels="none").digest() != ImageFolderSource(str(flat)).digest()


def test_grown_folder_keeps_its_old_units_and_puts_only_new_files_in_new_units(tmp_path):
    root = tmp_path / "faces"
    old = _images(root, [_name(i) for i in range(40)])
    config = IngestConfig(shard_size=6, holdout_fraction=0.2)
    source = ImageFolderSource(str(root))
    before = json.loads(json.dumps(source.partition(config).units))  # as a dataset's shard records give them back

    new = [_name(i) for i in range(40, 44)]  # 10% more files
    for i, name in enumerate(new):
        _image(root / name, "png", seed=100 + i)
    after = source.partition(config, base=before)
    for split, units in after.units.items():
        kept = [tuple(FileItem(*item) for item in unit) for unit in before.get(split, [])]
        assert units[: len(kept)] == kept  # the same items, labels and fingerprints, in the same order
        grown = [item.ref for unit in units[len(kept) :] for item in unit]
        assert sorted(grown) == sorted(set(new) & set(_refs(after, split)))
    assert sorted(_refs(after)) == sorted(old + new)

    # A changed file drops its old unit: that unit's other files go to new units with it.
    (root / old[0]).write_bytes((root / new[0]).read_bytes())
    changed = source.partition(config, base=before)
    assert old[0] in {item.ref for units in changed.units.values() for unit in units[-3:] for item in unit}
    assert sum(len(units) for units in changed.units.values()) >= sum(len(u) for u in after.units.values())


def test_grown_folder_ingests_against_its_previous_dataset(tmp_path):
    root = tmp_path / "faces"
    _images(root, [_name(i) for i in range(20)])
    config = IngestConfig(image_size=8, mode="RGB", shard_size=4, holdout_fraction=0.2)
    first = ingest(ImageFolderSource(str(root)), str(tmp_path / "v1"), config)
    _images(root, [f"new-{i}.png" for i in range(2)])
    second = ingest(ImageFolderSource(str(root)), str(tmp_path / "v2"), config, base=str(tmp_path / "v1"))
    assert first["num_samples"] == 20 and second["num_samples"] == 22
    assert second["carried"] == 20  # every old shard copied; only the two new files were encoded


def test_image_folder_on_s3(tmp_path, s3_bucket):
    names = _images(tmp_path / "flat", [_name(i) for i in range(6)])
    url = f"{s3_bucket.url}/flat"
    fs, path = filesystem(url, s3_bucket.storage_options)
    fs.put(str(tmp_path / "flat") + "/", path, recursive=True)
    source = ImageFolderSource(url, storage_options=s3_bucket.storage_options)
    partition = source.partition(IngestConfig(shard_size=4, holdout_fraction=0))
    assert partition.class_names == () and sorted(_refs(partition)) == sorted(names)
    assert all(item.fingerprint.split(":")[1] for unit in partition.units["train"] for item in unit)  # ETags
    read = _read(source, partition)
    assert {ref: data for ref, (_, data, _) in read.items()} == {n: (tmp_path / "flat" / n).read_bytes() for n in names}


# --- list files -------------------------------------------------------------------------------


def _csv(path, header, rows, delimiter=",") -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_with_relative_paths_and_string_labels(tmp_path):
    images = tmp_path / "data" / "img"
    _images(images, ["c0.png", "c1.jpg", "d0.webp", "d1.png", "o0.png"])
    absolute = tmp_path / "elsewhere" / "far.png"
    _image(absolute, "png16")
    rows = [["img/c0.png", "cat"], ["img/c1.jpg", "cat"], ["img/d0.webp", "dog"], ["img/d1.png", " dog "],
            ["img/o0.png", "owl"], [str(absolute), "owl"], [f"file://{absolute}", ""], ["", "cat"],
            ["img/c0.png", "dog"]]
    _csv(tmp_path / "data" / "list.csv", ["path", "label"], rows)
    source = ListSource(str(tmp_path / "data" / "list.csv"), label_column="label", allow_outside=True)
    partition = source.partition(IngestConfig(shard_size=2, holdout_fraction=0))

    assert partition.class_names == ("cat", "dog", "owl")
    assert _labels(partition) == {"img/c0.png": 0, "img/c1.jpg": 0, "img/d0.webp": 1, "img/d1.png": 1, "img/o0.png": 2,
                                  str(absolute): 2}
    assert [reason for _, reason in partition.ignored] == [
        "row 7 (line 8): no label in column 'label'",
        "row 8 (line 9): no path in column 'path'",
        "row 9 (line 10): repeats the path of row 1 (line 2)",
    ]
    assert {item.fingerprint for unit in partition.units["train"] for item in unit} == {""}
    read = _read(source, partition)
    assert read["img/d0.webp"] == (1, (images / "d0.webp").read_bytes(), None)
    assert read[str(absolute)] == (2, absolute.read_bytes(), None)

    named = ListSource(str(tmp_path / "data" / "list.csv"), label_column="label", class_names=("dog", "cat"),
                       allow_outside=True)
    assert _labels(named.partition(IngestConfig(holdout_fraction=0)))["img/c0.png"] == 1
    assert any("label 'owl' is neither one of class_names" in r for _, r in named.partition(IngestConfig()).ignored)


def test_jsonl_with_split_column_and_numeric_labels(tmp_path):
    _images(tmp_path / "img", [f"{i}.png" for i in range(6)])
    rows = [{"file": f"img/{i}.png", "split": "test" if i < 2 else "train", "label": [10, 2, 1][i % 3]}
            for i in range(6)]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = ListSource(str(tmp_path / "list.jsonl"), label_column="label", split_column="split")
    partition = source.partition(IngestConfig(shard_size=10, holdout_fraction=0.5))
    assert sorted(_refs(partition, "test")) == ["img/0.png", "img/1.png"]
    assert sorted(_refs(partition, "train")) == ["img/2.png", "img/3.png", "img/4.png", "img/5.png"]
    assert partition.class_names == ("1", "2", "10")  # numbers in numeric order
    assert _labels(partition) == {"img/0.png": 2, "img/1.png": 1, "img/2.png": 0, "img/3.png": 2, "img/4.png": 1,
                                  "img/5.png": 0}
    unlabelled = ListSource(str(tmp_path / "list.jsonl"), split_column="split").partition(IngestConfig())
    assert unlabelled.class_names == () and set(_labels(unlabelled).values()) == {0}


def test_parquet_list_with_given_class_names(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _images(tmp_path / "img", [f"{i}.jpg" for i in range(5)])
    table = pa.table({"image": [f"img/{i}.jpg" for i in range(5)], "label": [0, 1, 1, None, 0]})
    pq.write_table(table, tmp_path / "list.parquet")
    source = ListSource(str(tmp_path / "list.parquet"), label_column="label", class_names=("zero", "one"))
    partition = source.partition(IngestConfig(holdout_fraction=0))
    assert partition.class_names == ("zero", "one")
    assert _labels(partition) == {"img/0.jpg": 0, "img/1.jpg": 1, "img/2.jpg": 1, "img/4.jpg": 0}
    assert partition.ignored == (("img/3.jpg", "row 4: no label in column 'label'"),)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        ListSource(str(tmp_path / "broken.parquet")).partition(IngestConfig())


def test_missing_file_in_a_list_is_a_counted_skip_named_in_the_manifest(tmp_path):
    names = _images(tmp_path / "img", [f"{i:02d}." + ("png", "jpg", "webp", "png")[i % 4] for i in range(19)])
    _corrupt(tmp_path / "img" / "broken.png")
    rows = [[f"img/{n}", "ab"[i % 2]] for i, n in enumerate(names)]
    rows += [["img/missing.png", "a"], ["img/broken.png", "b"]]
    _csv(tmp_path / "list.tsv", ["filename", "class"], rows, delimiter="\t")
    source = ListSource(str(tmp_path / "list.tsv"), label_column="class")
    config = IngestConfig(image_size=8, mode="L", shard_size=6, max_bad_fraction=0.15)
    manifest = ingest(source, str(tmp_path / "ds"), config)

    assert manifest["num_samples"] == 19 and manifest["num_skipped"] == 2
    skipped = {s["ref"]: s["reason"] for split in manifest["splits"].values() for s in split["skipped"]}
    assert set(skipped) == {"img/missing.png", "img/broken.png"}
    assert skipped["img/missing.png"].startswith("unreadable: FileNotFoundError")
    assert manifest["class_names"] == ["a", "b"]
    assert sum(sum(s["class_counts"]) for s in manifest["splits"].values()) == 19
    assert manifest["source"]["kind"] == "list" and manifest["source"]["label_column"] == "class"


def test_bad_lists_fail_naming_the_file_and_row(tmp_path):
    _images(tmp_path / "img", ["a.png"])
    rows = [{"path": "img/a.png", "split": "train"}, {"path": "img/b.png", "split": "test"},
            {"path": "img/c.png", "split": "validation"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"list\.jsonl: row 3 \(line 3\): split 'validation' in column 'split'"):
        ListSource(str(tmp_path / "list.jsonl"), split_column="split").partition(IngestConfig())

    (tmp_path / "bad.jsonl").write_text('{"path": "img/a.png"}\n{"path": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: not valid JSON"):
        ListSource(str(tmp_path / "bad.jsonl")).partition(IngestConfig())
    (tmp_path / "bad.csv").write_text("path,label\nimg/a.png,x\nimg/b.png,y,extra\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: 3 fields, the header has 2"):
        ListSource(str(tmp_path / "bad.csv")).partition(IngestConfig())
    (tmp_path / "cols.csv").write_text("where,label\nimg/a.png,x\n")
    with pytest.raises(ValueError, match=r"cols\.csv: no path column; expected one of .*columns: \['where', 'label'\]"):
        ListSource(str(tmp_path / "cols.csv")).partition(IngestConfig())
    with pytest.raises(ValueError, match=r"list\.txt: a list file must end in one of \.csv, \.tsv, \.jsonl"):
        ListSource(str(tmp_path / "list.txt"))


def test_list_digest_follows_the_list_not_the_images(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png"])
    _csv(tmp_path / "list.csv", ["path"], [["img/a.png"], ["img/b.png"]])
    digest = source_digest(ListSource(str(tmp_path / "list.csv")))
    _image(tmp_path / "img" / "a.png", "png", seed=7)  # documented: a changed image behind an unchanged line
    assert source_digest(ListSource(str(tmp_path / "list.csv"))) == digest
    assert source_digest(ListSource(str(tmp_path / "list.csv"), label_column="path")) != digest
    _csv(tmp_path / "list.csv", ["path"], [["img/a.png"]])
    assert source_digest(ListSource(str(tmp_path / "list.csv"))) != digest


def test_list_on_s3_reads_relative_and_local_files_and_skips_a_missing_one(tmp_path, s3_bucket):
    """A remote list naming a local file: allowed only with allow_outside (tests/test_input_checks.py refuses it)."""
    _images(tmp_path / "up" / "img", ["a.png", "b.jpg"])
    local = tmp_path / "local.webp"
    _image(local, "webp")
    _csv(tmp_path / "up" / "list.csv", ["url"], [["img/a.png"], ["img/b.jpg"], ["img/gone.png"], [str(local)]])
    fs, path = filesystem(f"{s3_bucket.url}/data", s3_bucket.storage_options)
    fs.put(str(tmp_path / "up") + "/", path, recursive=True)
    source = ListSource(f"{s3_bucket.url}/data/list.csv", storage_options=s3_bucket.storage_options,
                        allow_outside=True)
    partition = source.partition(IngestConfig(holdout_fraction=0))
    assert partition.class_names == () and sorted(_refs(partition)) == sorted(["img/a.png", "img/b.jpg", "img/gone.png",
                                                                               str(local)])
    read = _read(source, partition)
    assert read["img/b.jpg"][1] == (tmp_path / "up" / "img" / "b.jpg").read_bytes()
    assert read[str(local)][1] == local.read_bytes()
    assert read["img/gone.png"][1] is None and read["img/gone.png"][2].startswith("unreadable: FileNotFoundError")


def test_a_list_of_http_urls_is_fetched_and_a_missing_one_is_a_counted_skip(tmp_path):
    import functools
    import http.server
    import threading

    served = tmp_path / "web"
    names = _images(served, [f"img{i}.png" for i in range(6)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        listing = tmp_path / "urls.jsonl"
        rows = [{"url": f"{base}/{name}"} for name in names] + [{"url": f"{base}/gone.png"}]
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = IngestConfig(image_size=8, mode="L", holdout_fraction=0, max_bad_fraction=0.2)
        manifest = ingest(ListSource(str(listing)), str(tmp_path / "ds"), config)
    finally:
        server.shutdown()
    assert manifest["num_samples"] == 6 and manifest["class_names"] == []
    skipped = manifest["splits"]["train"]["skipped"]
    assert [s["ref"] for s in skipped] == [f"{base}/gone.png"] and "FileNotFoundError" in skipped[0]["reason"]


def test_a_carried_shard_that_moves_to_another_index_is_renamed_not_encoded(tmp_path, monkeypatch):
    import storage.ingest
    from storage.shards import iter_samples

    root = tmp_path / "faces"
    _images(root, [_name(i) for i in range(12)])
    config = IngestConfig(image_size=8, mode="RGB", shard_size=4, holdout_fraction=0)
    first = ingest(ImageFolderSource(str(root)), str(tmp_path / "v1"), config)
    shard0 = first["splits"]["train"]["shards"][0]["name"]
    changed = json.loads(next(iter_samples(str(tmp_path / "v1" / shard0)))["json"])["source"]
    _image(root / changed, "png", seed=99)  # one file of shard 0 changes: shards 1 and 2 move down one place
    encoded = []
    encode = storage.ingest.prepare
    monkeypatch.setattr(storage.ingest, "prepare", lambda data, *args: encoded.append(1) or encode(data, *args))
    second = ingest(ImageFolderSource(str(root)), str(tmp_path / "v2"), config, base=str(tmp_path / "v1"))
    assert second["carried"] == 8 and len(encoded) == 4  # shards 1 and 2 carried, shard 0's four files again
    for index, shard in enumerate(second["splits"]["train"]["shards"]):
        keys = [s["__key__"] for s in iter_samples(str(tmp_path / "v2" / shard["name"]))]
        assert keys == [f"train-{index:06d}-{p:06d}" for p in range(shard["num_samples"])]  # each names its place
    old = {json.loads(s["json"])["source"]: s["png"] for sh in first["splits"]["train"]["shards"][1:]
           for s in iter_samples(str(tmp_path / "v1" / sh["name"]))}
    new = {json.loads(s["json"])["source"]: s["png"] for sh in second["splits"]["train"]["shards"][:2]
           for s in iter_samples(str(tmp_path / "v2" / sh["name"]))}
    assert new == old  # the same images, byte for byte, under their new keys
