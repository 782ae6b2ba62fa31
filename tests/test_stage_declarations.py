"""A stage is one module plus one line in the stage list: the pipeline, the stage flows, the
CLI's stage list and the keys follow from its declaration. The code around the stages has
no import loop, the pipeline flow names no stage module, and a config's keys are the same on
every machine."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.config import RUN_ONLY_FIELDS, PipelineConfig, TrainingRuntime, config_key, pipeline_config

REPO = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "0" * 64


# --- imports ---------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The modules of this project `path` imports, wherever in the file (a function-level import
    still runs); what only a type checker reads (`if TYPE_CHECKING:`) is left out."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import ingest`: a submodule
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph(top: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (REPO / top).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_tasks_have_no_import_loop():
    graph = _graph("tasks")
    assert {"tasks.machinery.reporting", "tasks.machinery.turns", "tasks.stages.sample"} <= graph.keys()
    assert {"tasks.machinery.reporting", "tasks.stage"} <= graph["tasks.stages.sample"]  # relative imports are found
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the finder finds one


def test_a_stage_imports_no_other_stage():
    """What a stage takes from another it reads through the manifest it is handed (its readers
    are the manifest's methods); the other's types are named for annotations only."""
    graph = _graph("tasks")
    stages = {name for name in graph if name.startswith("tasks.stages.")}
    assert len(stages) == 7
    assert {stage: sorted(graph[stage] & stages) for stage in stages if graph[stage] & stages} == {}


def test_the_pipeline_flow_names_every_stage_and_every_flow_is_found_by_its_name():
    """The pipeline reads as the pipeline: each stage a named call in `run_stages`; each flow
    prefect.yaml names is a module-level assignment or def; nothing is named at run time."""
    import yaml

    from tasks.stages import STAGES

    tree = ast.parse((REPO / "flows" / "pipeline.py").read_text())
    run_stages = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run_stages")
    called = {ast.unparse(node.func).split(".")[0] for node in ast.walk(run_stages) if isinstance(node, ast.Call)}
    constants = {stage.name: stage.name.upper().replace("-", "_") for stage in STAGES}
    assert set(constants.values()) <= called, sorted(set(constants.values()) - called)
    defined = {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
               if isinstance(target, ast.Name)} | {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    entrypoints = {d["entrypoint"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert {entry.removeprefix("flows.pipeline.") for entry in entrypoints} <= defined
    assert {f"{name.replace('-', '_')}_flow" for name in constants} <= defined
    made_at_run_time = subprocess.run(["grep", "-rn", r"globals()\|import_module", "flows", "tasks"], cwd=REPO,
                                      capture_output=True, text=True).stdout
    assert made_at_run_time == ""


# --- keys -----------------------------------------------------------------------------------


def test_a_configs_keys_never_read_the_machine(monkeypatch, tmp_path):
    from tasks.machinery.devices import on_this_machine
    from tasks.stages import stage_keys

    weights = tmp_path / "inception.pth"
    configs = [pipeline_config("smoke"), pipeline_config("fashion-mnist"),
               pipeline_config("smoke", evaluate={"inception_weights": str(weights)}),
               pipeline_config("smoke", training={"processes": 2, "device": "cpu"})]
    here = [stage_keys(config, DIGEST) for config in configs]

    # Another machine: 8 GPUs, and every file it is asked about (Inception's weights in its cache).
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    monkeypatch.setattr(os.path, "isfile", lambda path: True)
    monkeypatch.setattr(os.path, "exists", lambda path: True)
    assert [stage_keys(config, DIGEST) for config in configs] == here
    assert "train-classifiers[features]" in here[0]  # auto without a named file: domain features, here and there
    assert "train-classifiers[features]" not in here[2]  # a named file: Inception, here and there

    # `processes: auto` is this machine's GPUs: resolved where the run starts, never inside a key.
    automatic = pipeline_config("smoke", training={"processes": "auto"})
    with pytest.raises(ValueError, match="training.processes is auto"):
        stage_keys(automatic, DIGEST)
    assert on_this_machine(automatic).training.processes == 8
    assert on_this_machine(configs[0]) is configs[0]


def test_what_decides_no_artifact_is_declared_once_on_the_fields():
    smoke = pipeline_config("smoke", storage={"root": "/tmp/r"})
    assert config_key(smoke) == "8d03538eeb74e3a0"  # as before the declaration moved onto the fields
    for section, field, value in [("training", "device", "cpu"), ("training", "log_every", 7), ("encode", "batch_size", 8),
                                  ("runner", "dask_address", "tcp://127.0.0.1:8786"), ("source", "timeout_s", 3.0)]:
        changed = smoke.model_dump() | {section: getattr(smoke, section).model_dump() | {field: value}}
        assert config_key(PipelineConfig.model_validate(changed)) == config_key(smoke), f"{section}.{field}"
    assert config_key(pipeline_config("smoke", storage={"root": "/tmp/r"}, sample={"seed": 1})) != config_key(smoke)
    # What every stage may read of `training` is what decides nothing, and the launcher's node count.
    assert set(TrainingRuntime.model_fields) - {"nnodes"} == RUN_ONLY_FIELDS["training"]
    assert RUN_ONLY_FIELDS["runner"] is True and RUN_ONLY_FIELDS["encode"] is True


# --- a stage added ----------------------------------------------------------------------------

TOY_STAGE = '''
    """A toy stage: the train split's images per class, from the dataset's manifest."""
    from __future__ import annotations

    from typing import TYPE_CHECKING, Any

    from storage.fsutil import write_json

    from ..config import PipelineConfig, Runtime
    from ..machinery.artifacts import Artifact
    from ..machinery.cached import with_records
    from ..manifests import Manifest
    from ..stage import Needs, Settings, Stage, stage_task

    if TYPE_CHECKING:  # what it takes, for annotations only: a stage never imports another
        from .ingest import DatasetManifest


    class CountsManifest(Manifest):
        counts: list[int]


    class CountSettings(Settings):
        @classmethod
        def of(cls, config: PipelineConfig, variant: Any = None) -> CountSettings:
            return cls()


    def run(settings: CountSettings, runtime: Runtime, dataset: DatasetManifest) -> CountsManifest:
        return with_records(count, runtime.root, runtime.storage_options)(settings, runtime, dataset)


    STAGE = Stage(name="count-images", directory="counts", code_version="1", settings=CountSettings,
                  output=CountsManifest, inputs={"dataset": Needs("ingest")}, run=run,
                  summary="Count the train images of each class.")


    @stage_task(STAGE)
    def count(settings: CountSettings, runtime: Runtime, dataset: DatasetManifest, artifact: Artifact) -> CountsManifest:
        counts = dataset.splits["train"].class_counts
        write_json(artifact.path("counts.json"), counts, artifact.storage_options)
        return CountsManifest(**artifact.identity(), counts=counts)
'''

TOY_CHECK = '''
    import json, subprocess, sys
    from flows.parameters import sections_of
    from flows.pipeline import count_images_flow, vqvae2_pipeline
    from pipeline_helpers import smoke_config, state_names
    from tasks.stages import COUNT_IMAGES, FinishedRun, stage_keys

    config = smoke_config(sys.argv[1])
    state = vqvae2_pipeline(**sections_of(config), return_state=True)
    counts = FinishedRun(config).get(COUNT_IMAGES)
    again = count_images_flow(**sections_of(config))
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "--help"], capture_output=True, text=True)
    print(json.dumps({"state": state.type.value, "tasks": state_names(state.state_details.flow_run_id),
                      "counts": counts.counts, "url": counts.url, "again": again.key == counts.key,
                      "keys": stage_keys(config, "sha256:" + "0" * 64), "cli": cli.stdout}))
'''


# A stage added: its place in the stage list, its call in the pipeline, its flow.
TOY_EDITS = {
    "tasks/stages/__init__.py": [
        ("from .ingest import DatasetManifest, with_dataset_classes\n",
         "from .ingest import DatasetManifest, with_dataset_classes\nfrom .count_images import STAGE as COUNT_IMAGES\n"),
        ("STAGES: tuple[Stage, ...] = (INGEST, ", "STAGES: tuple[Stage, ...] = (INGEST, COUNT_IMAGES, "),
    ],
    "flows/pipeline.py": [
        ("from tasks.stages import (\n", "from tasks.stages import (\n    COUNT_IMAGES,\n"),
        ("    config = with_dataset_classes(config, dataset)  # the config the run records\n",
         "    config = with_dataset_classes(config, dataset)  # the config the run records\n"
         "    COUNT_IMAGES(config, runtime, dataset=dataset)\n"),
        ("ingest_flow = STAGE_FLOWS[INGEST.name]\n",
         "ingest_flow = STAGE_FLOWS[INGEST.name]\ncount_images_flow = STAGE_FLOWS[COUNT_IMAGES.name]\n"),
    ],
}


@pytest.mark.slow
def test_a_stage_added_is_its_module_its_place_in_the_list_and_its_call_in_the_flow(smoke_run, tmp_path):
    """A copy of the project with a toy stage: its module, its place in the stage list, its
    call in the pipeline flow and its stage flow's name (four lines added, two changed). It runs on another machine, as
    it were (a fresh PREFECT_HOME and its own Prefect server), on a copy of the smoke run's
    root: every task there is found Cached under the root, and nothing but the new stage's
    folder is written."""
    from pipeline_helpers import snapshot

    config, root, _ = smoke_run
    copy = tmp_path / "project"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (copy / "tasks" / "stages" / "count_images.py").write_text(textwrap.dedent(TOY_STAGE))
    added = 0
    for name, edits in TOY_EDITS.items():
        before = text = (copy / name).read_text()
        for old, new in edits:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        (copy / name).write_text(text)
        added += len(text.splitlines()) - len(before.splitlines())
    assert added <= 4  # and two lines changed

    moved = tmp_path / "root"
    shutil.copytree(root, moved)
    before = snapshot(moved)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH")}
    env |= {"PYTHONPATH": f"{copy}{os.pathsep}{REPO / 'tests'}", "PREFECT_HOME": str(tmp_path / "another-machine"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(TOY_CHECK), str(moved)], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert seen["state"] == "COMPLETED"
    # The pipeline ran it, and nothing else: every other stage was there already. Planning an
    # ingest is done again: its result is a pickle, which the worker keeps in its own result
    # storage, never under the root (a root's writer must not choose what unpickles).
    assert [s for name, s in seen["tasks"].items() if name.startswith("count-images")] == ["Completed"]
    again = {name: s for name, s in seen["tasks"].items() if s != "Cached" and not name.startswith("count-images")}
    assert list(again) == ["plan-dataset"], again
    assert len(seen["tasks"]) > 20
    after = snapshot(moved)
    ours = ("counts/", "runs/")  # the new stage's folder, and the run's record, which now names it
    unchanged = {name: v for name, v in before.items() if not name.startswith(ours)}
    assert {name: v for name, v in after.items() if not name.startswith(ours)} == unchanged  # nothing else written
    # (The smoke root may hold other configs' runs too, made by tests before this one.)
    records = [json.loads((moved / name).read_text()) for name in after if name.startswith("runs/")]
    (record,) = [record for record in records if "count-images" in record["artifacts"]]
    assert record["artifacts"]["count-images"] == seen["url"].removeprefix(f"{moved}/")
    assert sum(seen["counts"]) == 2000 and seen["url"].startswith(f"{moved}/counts/")
    assert json.loads((Path(seen["url"]) / "counts.json").read_text()) == seen["counts"]
    assert seen["again"]  # its stage flow finds it
    assert "count-images" in seen["cli"] and "count-images" in seen["keys"]
    assert {k: v for k, v in seen["keys"].items() if k != "count-images"} == _keys_without_it(config)


def _keys_without_it(config: PipelineConfig) -> dict[str, str]:
    from tasks.stages import stage_keys

    return stage_keys(config, DIGEST)


def test_a_cache_record_written_when_manifests_lived_elsewhere_still_reads(tmp_path):
    """Prefect names a result's class in its cache record; a manifest type that moved to its
    stage's module (tasks.manifests.PriorManifest, before) is found by its name, and no class
    outside this project is ever looked up."""
    from prefect.serializers import JSONSerializer

    from tasks.machinery.artifacts import Artifact
    from tasks.machinery.cached import CacheRecords
    from tasks.manifests import record_type
    from tasks.stages.sample import SampleBatch

    artifact = Artifact(str(tmp_path / "root"), "samples", "0123456789abcdef")
    result = json.loads(JSONSerializer().dumps(SampleBatch(index=3, url="samples/0123456789abcdef/batches/batch-00003.npz", images=8)))
    assert result["__class__"] == "tasks.stages.sample.SampleBatch"
    result["__class__"] = "tasks.manifests.SampleBatch"  # where it was
    record = {"metadata": {"storage_key": artifact.record("batch-00003"), "serializer": {"type": "json"}},
              "result": json.dumps(result)}
    (tmp_path / "root" / artifact.record("batch-00003")).parent.mkdir(parents=True)
    (tmp_path / "root" / artifact.record("batch-00003")).write_text(json.dumps(record))
    read = json.loads(CacheRecords(root=str(tmp_path / "root")).read_path(artifact.record("batch-00003")))
    batch = JSONSerializer().loads(read["result"].encode())
    assert isinstance(batch, SampleBatch) and batch.url == artifact.path("batches", "batch-00003.npz")
    assert record_type("os.system") is None and record_type("tasks.nothing.SampleBatch") is SampleBatch
