"""Data that cannot train is refused before any training, in one line saying what is needed:
too few images for the splits and the evaluation, images far smaller than the model's input,
a chosen class without held-out images; a tar that is no tar before Prefect starts."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from installed_cli import installed, prefect_started


def _folder(folder, count: int, side: int, seed: int = 0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _refused_before_training(capsys, tmp_path, source, *settings: str) -> str:
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "smoke", "--root", str(root), "--source", str(source), *settings])
    printed = capsys.readouterr().err
    ours = [line for line in printed.splitlines() if line.startswith("vqvae2: ")]
    assert exit_info.value.code == 2 and len(ours) == 1, printed[-3000:]
    err = ours[0]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["datasets"], err  # nothing trained
    return err


@pytest.mark.slow  # a pipeline run, refused after its ingest
def test_a_folder_of_one_image_is_refused_before_any_training(prefect_api, tmp_path, capsys):
    err = _refused_before_training(capsys, tmp_path, _folder(tmp_path / "one", 1, 28))
    assert "1 training and 0 held-out (test) images; training the classifiers needs at least 1 training and 1 " \
           "held-out (test) images: give the source more images, or hold more of them out" in err, err


@pytest.mark.slow
def test_images_far_smaller_than_the_model_input_are_refused_at_the_end_of_ingest(prefect_api, tmp_path, capsys):
    tiny = _folder(tmp_path / "tiny", 40, 1)
    err = _refused_before_training(capsys, tmp_path, tiny)
    assert "40 of 40 images have a shorter side under 4 pixels, and the model's 16-pixel input would enlarge them " \
           "more than 4 times, into blur: give larger images, or skip these with ingest.min_size=4" in err, err
    assert "datasets" in err and not list((tmp_path / "root").glob("datasets/*/manifest.json"))


@pytest.mark.slow
def test_a_chosen_class_without_held_out_images_is_refused_before_any_training(prefect_api, tmp_path, capsys):
    """Class folders; `boots` is in the training split only (explicit splits)."""
    for split, classes in (("train", ("boots", "shirts")), ("test", ("shirts",))):
        for index, name in enumerate(classes):
            _folder(tmp_path / "photos" / split / name, 12, 20, seed=index)
    err = _refused_before_training(capsys, tmp_path, tmp_path / "photos", "--set", 'sample.classes=["boots"]')
    assert "sample.classes: 'boots' has no held-out (test) image" in err, err


def test_a_gzip_file_posing_as_a_tar_is_refused_before_prefect_starts(tmp_path):
    for i in range(2):
        (tmp_path / f"data-{i:03d}.tar").write_bytes(gzip.compress(b"not a tar at all " * 100))
    home = tmp_path / "home"
    done, _ = installed(["run", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source",
                          str(tmp_path / "data-{000..001}.tar")], home, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"vqvae2: {tmp_path / 'data-000.tar'}: not a readable tar shard"), done.stderr
    assert not prefect_started(home) and not (tmp_path / "root").exists()
