"""Rendering the Helm chart for the chart tests: `helm template` from the project's tool cache
(hack/build-tools.sh), output parsed into a list of objects."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from built_tools import built_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "finetune-operator"
RELEASE = "fto"
NAMESPACE = "finetune-system"

Obj = dict[str, Any]


@cache
def helm_binary() -> str:
    """helm as hack/build-tools.sh builds it."""
    return built_tool("helm")


def helm(*args: str, chart: Path = CHART, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "HELM_CACHE_HOME": "/tmp/fto-helm-cache",
            "HELM_CONFIG_HOME": "/tmp/fto-helm-config",
            "HELM_DATA_HOME": "/tmp/fto-helm-data",
        },
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template_args(*values: str, values_files: tuple[Path, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for value in values:
        args += ["--set", value]
    for path in values_files:
        args += ["--values", str(path)]
    return args


def render_text(*values: str, values_files: tuple[Path, ...] = ()) -> str:
    return helm(*template_args(*values, values_files=values_files)).stdout


def render(*values: str, values_files: tuple[Path, ...] = ()) -> list[Obj]:
    """The chart's objects for these `--set` values."""
    text = render_text(*values, values_files=values_files)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def load_values() -> Obj:
    return yaml.safe_load((CHART / "values.yaml").read_text())
