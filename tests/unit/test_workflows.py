"""The GitHub Actions workflows pass actionlint (built by hack/build-tools.sh from the pinned
tools module hack/tools/actionlint); a skip locally when it is not built yet, a failure in CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from built_tools import built_tool

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"


def actionlint_binary() -> str:
    return built_tool("actionlint")


def workflow_files() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def test_actionlint_is_clean() -> None:
    files = workflow_files()
    assert files, f"no workflows in {WORKFLOWS}"
    result = subprocess.run(
        [actionlint_binary(), "-no-color", *map(str, files)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_pushes_every_image_and_the_chart() -> None:
    """The release builds the Dockerfile's two targets, the trainer for each device the
    Dockerfile knows, and pushes the chart as an OCI artifact."""
    workflow = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    # PyYAML reads the key `on` as True.
    assert workflow[True]["push"]["tags"] == ["v*"]
    matrix = workflow["jobs"]["images"]["strategy"]["matrix"]["include"]
    assert {(m["target"], m["device"]) for m in matrix} == {
        ("operator", ""),
        ("trainer", "xpu"),
        ("trainer", "cuda"),
        ("trainer", "cpu"),
    }
    chart_steps = " ".join(step.get("run", "") for step in workflow["jobs"]["chart"]["steps"])
    assert "helm package charts/finetune-operator" in chart_steps
    assert "oci://ghcr.io/${OWNER}/charts" in chart_steps
