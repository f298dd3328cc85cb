"""The operator's RBAC rules: one definition (rbac.py), the chart's files generated from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from finetune_operator.rbac import LEADER_ELECTION_RULES, RULES, rules_yaml

CHART_FILES = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "files"


def test_chart_rule_files_match_the_code() -> None:
    for file, leader in [("operator-rules.yaml", False), ("leader-election-rules.yaml", True)]:
        text = (CHART_FILES / file).read_text()
        assert text == rules_yaml(leader_election=leader), (
            f"charts/finetune-operator/files/{file} drifted: regenerate with "
            f"`finetune-operator rbac{' --leader-election' if leader else ''} > ...`"
        )


def test_cli_prints_the_rules() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "rbac"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert yaml.safe_load(out) == RULES


def test_rules_are_least_privilege() -> None:
    verbs = {
        (group, resource): set(rule["verbs"])
        for rule in RULES + LEADER_ELECTION_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert all("*" not in v for v in verbs.values())
    assert verbs[("", "pods")] == {"list", "watch"}  # pods are the Job controller's
    assert verbs[("finetune.dev", "finetunejobs")] == {"get", "list", "watch"}  # spec is the user's
    assert "delete" not in verbs[("", "configmaps")]  # owner references delete them
    assert ("", "secrets") not in verbs  # the hub token is passed by reference only
    assert verbs[("coordination.k8s.io", "leases")] == {"get", "create", "update"}
