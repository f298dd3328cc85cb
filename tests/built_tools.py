"""Tools that hack/build-tools.sh builds from the pinned Go modules, found for the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BUILD_TOOLS = Path(__file__).resolve().parents[1] / "hack" / "build-tools.sh"


def built_tool(name: str) -> str:
    """The path of `name` as hack/build-tools.sh builds it: a skip locally when it is not built
    yet, a failure in CI (CI must run what needs it, never skip it)."""
    path = subprocess.run(
        [str(BUILD_TOOLS), "--path"], check=True, capture_output=True, text=True
    ).stdout.strip()
    found = shutil.which(name, path=path)
    if found is None:
        message = f"{name} is not built: run hack/build-tools.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found
