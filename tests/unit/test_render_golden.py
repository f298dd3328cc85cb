"""Golden files: a FinetuneJob in, the manifests `finetune-operator render` prints out.

Regenerate after an intended change: UPDATE_GOLDEN=1 pytest tests/unit/test_render_golden.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_operator.cli import main, render
from finetune_operator.settings import OperatorSettings

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(path.stem.removesuffix(".in") for path in GOLDEN.glob("*.in.yaml"))


@pytest.mark.parametrize("case", CASES)
def test_render_matches_golden(case: str) -> None:
    rendered = render((GOLDEN / f"{case}.in.yaml").read_text(), OperatorSettings())
    expected = GOLDEN / f"{case}.out.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(rendered)
    assert rendered == expected.read_text()


def test_golden_cases_exist() -> None:
    assert {"qlora-4x2", "dpo", "cpu-tiny"} <= set(CASES)


def test_render_cli_rejects_bad_spec_with_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((GOLDEN / "qlora-4x2.in.yaml").read_text().replace("workers: 4", "workers: 3"))
    assert main(["render", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "World sizes that work: 1, 2, 4, 8, 16, 32, 64" in err


def test_render_is_a_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "render", str(GOLDEN / "dpo.in.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"learningRate": 5e-05' in result.stdout
