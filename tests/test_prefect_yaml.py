"""prefect.yaml, and the variants of it the README and docs/deployment.md print, read as Prefect
reads them: the entrypoints are flows, the schedules ship inactive, the pull step is cheap and
fails clearly, the git and Docker variants are complete. No server: tests/test_deployment.py
deploys the file for real."""
from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PROJECT["deployments"]}
SHELL_STEP = "prefect.deployments.steps.run_shell_script"


def _blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / page).read_text(), re.S)


def _yaml_blocks(page: str) -> list[dict]:
    return [yaml.safe_load(block) for block in _blocks(page, "yaml")]


def _step(steps: list[dict], name: str) -> dict:
    """The arguments of the first step called `name` (a step is `{function path: arguments}`)."""
    return next(args for step in steps for function, args in step.items() if function == name)


def test_every_entrypoint_is_a_flow():
    from prefect import Flow

    assert {"full-pipeline", "nightly", "watch", "new-data"} <= set(DEPLOYMENTS)
    for name, deployment in DEPLOYMENTS.items():
        module, _, attribute = deployment["entrypoint"].rpartition(".")
        assert ":" not in deployment["entrypoint"], f"{name}: a module path, not a file of the deploying machine"
        flow = getattr(importlib.import_module(module), attribute, None)
        assert isinstance(flow, Flow), f"{name}: {deployment['entrypoint']} is not a flow"
        assert deployment["parameters"] == PROJECT["definitions"]["parameters"], f"{name}: one config for all"


def test_scheduled_deployments_ship_inactive():
    scheduled = {name: d["schedules"] for name, d in DEPLOYMENTS.items() if d.get("schedules")}
    assert set(scheduled) == {"nightly", "watch"}
    for name, schedules in scheduled.items():
        assert all(schedule.get("active") is False for schedule in schedules), f"{name} starts runs by itself"
    assert scheduled["nightly"][0]["cron"] == "0 2 * * *" and scheduled["watch"][0]["interval"] == 600


def _pull_check() -> list[str]:
    """The pull step's command, as run_shell_script splits it (one command, no shell)."""
    script = _step(PROJECT["pull"], SHELL_STEP)["script"]
    assert len(script.splitlines()) == 1
    argv = shlex.split(script)
    assert argv[:2] == ["python3", "-c"]
    return argv


def test_pull_step_imports_nothing_heavy(tmp_path):
    """A worker pays the pull step on every run: it looks the flows up, never imports them
    (importing flows.pipeline takes torch and Prefect: seconds)."""
    argv = _pull_check()
    done = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "flows" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "prefect", "tasks", "vqvae2", "storage")
                or m == "flows.pipeline"}


def test_pull_step_fails_clearly_without_the_project(tmp_path):
    argv = _pull_check()
    # -I -S: no site-packages, so no installed project: as on a worker that lacks it.
    done = subprocess.run([sys.executable, "-I", "-S", *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not installed" in done.stderr and ".ci/install" in done.stderr and "Traceback" not in done.stderr


def test_readme_smoke_parameters_fit_prefect_yaml():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a Prefect server", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    parameters = yaml.safe_load(block)["definitions"]["parameters"]
    assert parameters["preset"] == "smoke" and parameters["storage"]["root"]
    assert set(parameters) <= set(PROJECT["definitions"]["parameters"]) | {"source"}
    steps = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    # The yaml is edited before deploying; the server answers before the pool is made; one run.
    assert section.index("```yaml") < section.index("```bash") and "prefect deploy --all" in steps
    assert steps.index("/health") < steps.index("prefect work-pool create")
    runs = [line for line in steps.splitlines() if line.startswith("prefect deployment run")]
    assert runs == [line for line in runs if "full-pipeline --watch" in line] and len(runs) == 1


def test_git_clone_variant_uses_the_clone():
    (variant,) = [b for b in _yaml_blocks("docs/deployment.md") if "pull" in b]
    steps = variant["pull"]
    assert next(iter(steps[0])) == "prefect.deployments.steps.git_clone"
    clone = _step(steps, "prefect.deployments.steps.git_clone")
    assert clone["repository"].endswith(".git") and clone["branch"] and clone["id"]
    later = [args for step in steps[1:] for args in step.values()]
    assert {"directory": f"{{{{ {clone['id']}.directory }}}}"} in later  # set_working_directory
    assert _step(steps, "prefect.deployments.steps.set_working_directory")
    check = shlex.split(_step(steps, SHELL_STEP)["script"])
    assert check[:2] == ["python3", "-c"] and "flows.pipeline" in check[2] and "import flows" not in check[2]


def test_docker_variant_builds_an_image_the_pool_runs():
    (variant,) = [b for b in _yaml_blocks("docs/deployment.md") if "build" in b]
    build = _step(variant["build"], "prefect_docker.deployments.steps.build_docker_image")
    assert build["dockerfile"] == "Dockerfile" and build["image_name"] and build["tag"]
    assert "prefect-docker" in build["requires"]
    push = _step(variant["push"], "prefect_docker.deployments.steps.push_docker_image")
    assert push["image_name"] == f"{{{{ {build['id']}.image_name }}}}"
    pool = variant["definitions"]["work_pool"]
    assert pool["name"] == PROJECT["definitions"]["work_pool"]["name"]
    assert pool["job_variables"]["image"] == f"{{{{ {build['id']}.image }}}}"
    (dockerfile,) = _blocks("docs/deployment.md", "dockerfile")
    assert dockerfile.startswith("FROM python:3.11") and re.search(r"^RUN pip install .*\.$", dockerfile, re.M)


PAGES_WITH_YAML = [page for page in ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
                   if "```yaml" in (REPO / page).read_text()]


def test_the_pages_that_print_yaml_are_found():
    assert {"README.md", "docs/deployment.md"} <= set(PAGES_WITH_YAML)


@pytest.mark.parametrize("page", PAGES_WITH_YAML)
def test_printed_yaml_parses(page):
    blocks = _yaml_blocks(page)
    assert blocks and all(isinstance(block, dict) for block in blocks)
