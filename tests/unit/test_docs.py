"""docs/ stays true to the code: every condition reason and metric is documented, every link
and example path resolves, every chart value the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from finetune_operator.status import Reason

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = ["quickstart.md", "reference.md", "operations.md", "architecture.md", "images.md"]
NOTES = ROOT / "charts" / "finetune-operator" / "templates" / "NOTES.txt"


def text(page: str) -> str:
    return (DOCS / page).read_text()


def test_the_pages_exist() -> None:
    for page in PAGES:
        assert (DOCS / page).is_file(), page


def test_every_condition_reason_is_in_the_troubleshooting_table() -> None:
    operations = text("operations.md")
    missing = [r.value for r in Reason if f"`{r.value}`" not in operations]
    assert missing == [], "add these reasons to docs/operations.md"


def test_every_metric_is_documented() -> None:
    source = (ROOT / "operator" / "finetune_operator" / "metrics.py").read_text()
    names = re.findall(r'(?:Gauge|Histogram|PromCounter|Counter)\(\s*"(\w+)"', source)
    assert names
    operations = text("operations.md")
    for name in names:
        exposed = name + "_total" if re.search(rf'PromCounter\(\s*"{name}"', source) else name
        assert exposed in operations, exposed


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text(page)):
        if "://" in target:
            continue
        assert (DOCS / target).resolve().exists(), f"{page}: {target}"


@pytest.mark.parametrize("source", [*(DOCS / p for p in PAGES), NOTES], ids=lambda p: p.name)
def test_example_paths_exist(source: Path) -> None:
    for path in re.findall(r"examples/[\w.-]+\.yaml", source.read_text()):
        assert (ROOT / path).is_file(), f"{source.name}: {path}"


def test_chart_values_named_in_the_docs_exist() -> None:
    values = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "values.yaml").read_text())
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"`((?:operator|trainer|metrics|crds|rbac)\.[\w.]+)", text(page)))
        named |= set(re.findall(r"--set '?((?:operator|trainer|metrics|crds)\.[\w.]+)", text(page)))
    assert named
    for dotted in sorted(named):
        node = values
        for key in dotted.split("."):
            assert isinstance(node, dict) and key in node, f"docs name chart value {dotted}"
            node = node[key]
