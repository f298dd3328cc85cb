"""The operator's runtime pieces without a cluster: flags and env, metrics, the Lease rule,
the SSA subset check."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from finetune_operator.controller.kube import is_subset
from finetune_operator.controller.leader import lease_is_free
from finetune_operator.metrics import count_phases
from finetune_operator.objects import JobRef, build_desired_objects
from finetune_operator.resolve import parse_spec, resolve
from finetune_operator.settings import OperatorSettings, parse_args

# -- flags and env ------------------------------------------------------------------------------


def test_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FTO_NAMESPACES", "FTO_TRAINER_IMAGE", "FTO_XPU_RESOURCE", "POD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    config = parse_args([])
    assert config.clusterwide and config.settings.namespaces == ()
    assert (
        config.metrics_port == 8080 and config.leader_elect and config.lease_namespace == "default"
    )

    config = parse_args(
        [
            "-n",
            "a,b",
            "--namespace",
            "c",
            "--trainer-image",
            "img:1",
            "--xpu-resource",
            "gpu.intel.com/xe",
            "--log-format",
            "json",
            "--worker-limit",
            "3",
            "--qps",
            "5",
            "--no-leader-elect",
        ]
    )
    assert not config.clusterwide and config.settings.namespaces == ("a", "b", "c")
    assert config.settings.trainer_image == "img:1"
    assert config.settings.device_resources == {"xpu": "gpu.intel.com/xe"}
    assert (config.log_format, config.worker_limit, config.qps) == ("json", 3, 5.0)
    assert not config.leader_elect and config.lease_namespace == "a"

    monkeypatch.setenv("FTO_NAMESPACES", "x")
    monkeypatch.setenv("FTO_LEADER_ELECT", "false")
    monkeypatch.setenv("FTO_EXTRA_POD_LABELS", "finetune.dev/simulate=manual")
    config = parse_args([])
    assert config.settings.namespaces == ("x",) and not config.leader_elect
    assert config.settings.extra_pod_labels == {"finetune.dev/simulate": "manual"}


def test_extra_pod_labels_only_reach_the_pod_template() -> None:
    spec = parse_spec({"model": {"name": "m"}, "dataset": {"name": "d"}})
    settings = OperatorSettings(extra_pod_labels={"finetune.dev/simulate": "manual"})
    desired = build_desired_objects(JobRef("j", "ns", "uid"), spec, resolve(spec), settings)
    job = desired.job
    assert job["spec"]["template"]["metadata"]["labels"]["finetune.dev/simulate"] == "manual"
    assert all("finetune.dev/simulate" not in o["metadata"]["labels"] for o in desired.all())
    default = build_desired_objects(
        JobRef("j", "ns", "uid"), spec, resolve(spec), OperatorSettings()
    )
    assert "finetune.dev/simulate" not in default.job["spec"]["template"]["metadata"]["labels"]


# -- metrics, lease, subset -----------------------------------------------------------------------


def test_count_phases() -> None:
    bodies = [{"status": {"phase": "Running"}}, {"status": {"phase": "Running"}}, {}]
    counts = count_phases(bodies)
    assert counts["Running"] == 2 and counts["Pending"] == 1 and counts["Failed"] == 0
    assert set(counts) == {
        "Pending",
        "Queued",
        "Running",
        "Restarting",
        "Preempted",
        "Suspended",
        "Succeeded",
        "Failed",
    }


NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("spec", "free"),
    [
        ({}, True),
        ({"holderIdentity": "me", "renewTime": NOW.isoformat(), "leaseDurationSeconds": 15}, True),
        (
            {"holderIdentity": "other", "renewTime": NOW.isoformat(), "leaseDurationSeconds": 15},
            False,
        ),
        (
            {
                "holderIdentity": "other",
                "renewTime": (NOW - timedelta(seconds=16)).isoformat(),
                "leaseDurationSeconds": 15,
            },
            True,
        ),
    ],
)
def test_lease_is_free(spec: dict[str, Any], free: bool) -> None:
    assert lease_is_free(spec, "me", NOW) is free


@pytest.mark.parametrize(
    ("desired", "live", "same"),
    [
        ({"a": 1}, {"a": 1, "server": "default"}, True),
        ({"a": {"b": [1, {"c": "x"}]}}, {"a": {"b": [1, {"c": "x", "d": 0}]}}, True),
        ({"a": [1, 2]}, {"a": [1]}, False),
        ({"suspend": False}, {"suspend": True}, False),
        ({"suspend": False}, {}, False),
        ({"n": 1}, {"n": 1.0}, True),
    ],
)
def test_is_subset(desired: Any, live: Any, same: bool) -> None:
    assert is_subset(desired, live) is same
