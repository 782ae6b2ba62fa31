"""A failed run ends with a short Markdown artifact: the stage, the first line of the error,
what to do; the run still ends Failed with its own error. Against a real Prefect API."""
from __future__ import annotations

import pytest

from flows.parameters import sections_of
from flows.pipeline import STAGE_FLOWS, vqvae2_pipeline
from storage.shards import ShardError
from tasks.machinery.cached import RETRIES
from tasks.machinery.failure_report import KEY, failed_stage, failing_in, failure_markdown
from image_files import truncated_tars
from pipeline_helpers import artifacts, smoke_config


def _failure_report(flow_run_id) -> str:
    reports = [a for a in artifacts(flow_run_id) if (a.key or "").startswith(KEY) and a.type == "markdown"]
    assert len(reports) == 1, [(a.key, a.type) for a in artifacts(flow_run_id)]
    return reports[0].data


@pytest.mark.parametrize("run", [vqvae2_pipeline, STAGE_FLOWS["ingest"]], ids=["pipeline", "ingest-flow"])
def test_a_failed_stage_leaves_a_report_naming_it_why_and_what_to_do(prefect_api, tmp_path, run):
    config = smoke_config(str(tmp_path / "root"), source={"url": truncated_tars(tmp_path / "tars")},
                          overrides={"num_classes": 0})
    state = run(**sections_of(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(ShardError, match=r"00001\.tar: .*truncated"):  # the run's own error, unchanged
        state.result()
    report = _failure_report(state.state_details.flow_run_id)
    assert report.startswith("# vqvae2 run failed in stage `ingest`\n")
    assert "ShardError" in report and "00001.tar: " in report and "truncated" in report
    assert "fix the cause named above and run again: finished stages are reused" in report
    assert "Traceback" not in report and "retried" not in report


def test_a_transient_error_is_reported_with_its_retries_and_without_credentials():
    error = ConnectionError("s3://AKIAEXAMPLE:hunter2@runs/vqvae2/codes/x.zarr: connection reset by peer\n"
                            "  details on a second line")
    report = failure_markdown(error, "encode")
    assert report.startswith("# vqvae2 run failed in stage `encode`\n")
    assert "`ConnectionError`" in report and "s3://runs/vqvae2/codes/x.zarr: connection reset by peer" in report
    assert f"the stage was retried {RETRIES} times" in report and "it resumes where it stopped" in report
    assert "hunter2" not in report and "AKIAEXAMPLE" not in report and "second line" not in report
    assert "finished stages are reused" not in report


def test_an_error_is_named_after_the_innermost_stage_it_left():
    """A stage awaiting another's output re-raises that one's error: it names the other."""
    error = ValueError("bad shard")
    with pytest.raises(ValueError), failing_in("sample"), failing_in("train-priors[0]"):
        raise error
    assert failed_stage(error) == "train-priors[0]"
    assert error.__notes__ == ["in vqvae2 stage: train-priors[0]"]  # a traceback says so too
    assert str(error) == "bad shard" and failed_stage(ValueError("bad shard")) is None


# --- a field to set, named where the user reads it ------------------------------------------


def _too_many_bad_images(folder, images) -> BaseException:
    """The real error of an ingest with one unreadable file of 21 and no bad image allowed."""
    from image_files import write_folder
    from storage.ingest import IngestConfig, ingest
    from storage.sources import ImageFolderSource

    write_folder(folder / "images", images[:20])  # and one broken file
    with pytest.raises(ValueError, match="1 of 21 images could not be used") as raised:
        ingest(ImageFolderSource(str(folder / "images"), labels="none"), str(folder / "dataset"),
               IngestConfig(image_size=16, max_bad_fraction=0.0))
    return raised.value


def test_too_many_bad_images_advise_the_share_that_passes_in_the_form_of_where_it_is_read(
        tmp_path, fashion_mnist_test_split, monkeypatch, capsys):
    from flows.cli import main
    from tasks.config import PipelineConfig
    from tasks.machinery.failures import advice

    error = _too_many_bad_images(tmp_path, fashion_mnist_test_split[0])
    assert "--set ingest.max_bad_fraction=0.05" in advice(error, form="cli")  # 1 <= 0.05 * 21: it would pass
    report = failure_markdown(error, "ingest")
    assert '**What to do:** fix the cause named above, or run again with the parameters {"ingest": ' \
           '{"max_bad_fraction": 0.05}}: finished stages are reused.' in report
    assert "--set" not in report

    def fails(self) -> None:
        raise error

    monkeypatch.setattr(PipelineConfig, "check_source", fails)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "smoke", "--root", str(tmp_path / "root"), "--source", str(tmp_path / "images")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.endswith("what to do: fix the cause named above, or run again with --set "
                        "ingest.max_bad_fraction=0.05: finished stages are reused.\n"), err


def test_a_setting_error_names_its_fix_per_form_and_survives_pickling():
    import pickle

    from tasks.setting_forms import Setting
    from tasks.machinery.failures import SettingError, advice, first_line

    error = SettingError("the dataset has 3 classes (a, b, c) but the model has num_classes=10", Setting("num_classes", 3))
    again = pickle.loads(pickle.dumps(error))  # as a task's error travels
    assert str(again) == str(error) and again.fixes == (Setting("num_classes", 3),)
    assert advice(again, form="cli").startswith("fix the cause named above, or run again with --set num_classes=3:")
    assert 'with the parameters {"overrides": {"num_classes": 3}}' in advice(again, form="parameters")
    assert first_line(again) == "the dataset has 3 classes (a, b, c) but the model has num_classes=10"


@pytest.mark.parametrize("message, cli, parameters", [
    ("a.csv: 2 rows lie outside the list's folder. Move the files beside the list, or set source.allow_outside=true "
     "(ListSource.allow_outside) to read them",
     "or --set source.allow_outside=true (ListSource", 'or set {"source": {"allow_outside": true}} (ListSource'),
    ("tars: a held-out test split needs at least two tars; pass urls={...} or set ingest.holdout_fraction=0",
     "or --set ingest.holdout_fraction=0", 'or set {"ingest": {"holdout_fraction": 0}}'),
    ("more than ingest.max_bad_fraction=0.01; fix or remove them", "more than ingest.max_bad_fraction=0.01;",
     "more than ingest.max_bad_fraction=0.01;"),  # a value it had, not one to set: as it is
])
def test_an_instruction_to_set_a_field_is_shown_in_the_form_of_where_it_is_read(message, cli, parameters):
    from tasks.machinery.failures import first_line

    assert cli in first_line(ValueError(message), form="cli")
    assert parameters in first_line(ValueError(message), form="parameters")
    assert parameters in failure_markdown(ValueError(message), "ingest")
