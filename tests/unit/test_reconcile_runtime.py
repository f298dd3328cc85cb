"""The operator's runtime pieces without a cluster: flags and env, metrics, the Lease rule,
the SSA subset check, and the local pod runner's kubelet duties (env, $(VAR), paths, ports)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.controller.kube import is_subset
from finetune_operator.controller.leader import lease_is_free
from finetune_operator.metrics import count_phases
from finetune_operator.objects import JobRef, build_desired_objects
from finetune_operator.resolve import parse_spec, resolve
from finetune_operator.runner import Runner, expand, field_value, map_paths
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


# -- the local runner ---------------------------------------------------------------------------------


def test_expand_like_the_kubelet() -> None:
    env = {"RANK": "1", "A": "x"}
    assert expand("--node-rank=$(RANK)", env) == "--node-rank=1"
    assert expand("$(MISSING) $$(RANK) $(A)$(A)", env) == "$(MISSING) $(RANK) xx"


def test_field_value() -> None:
    pod = {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "annotations": {"batch.kubernetes.io/job-completion-index": "3"},
        },
        "spec": {"nodeName": "gpu-node-1"},
    }
    assert (
        field_value(pod, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "3"
    )
    assert field_value(pod, "metadata.namespace") == "ns"
    assert field_value(pod, "spec.nodeName") == "gpu-node-1"
    with pytest.raises(ValueError, match="not supported"):
        field_value(pod, "status.qosClass")


def test_map_paths_longest_first_and_only_whole_paths() -> None:
    mounts = [("/output", "/w/out"), ("/etc/finetune", "/w/cfg")]
    assert map_paths("--config /etc/finetune/config.json", mounts) == "--config /w/cfg/config.json"
    assert map_paths('{"outputPath": "/output"}', mounts) == '{"outputPath": "/w/out"}'
    assert map_paths("/outputs /x/output", mounts) == "/outputs /x/output"
    assert map_paths("HF_HOME=/output/.cache", mounts) == "HF_HOME=/w/out/.cache"


@dataclass
class FakeKube:
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))


def test_runner_prepares_the_pod_as_written(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "model": {"name": "m"},
            "dataset": {"name": "d"},
            "device": "cpu",
            "workers": 2,
            "hfTokenSecret": {"name": "hub"},
        }
    )
    resolved = resolve(spec)
    job = JobRef("tiny", "ns", "ftj-uid")
    desired = build_desired_objects(job, spec, resolved, OperatorSettings())
    config_map = next(o for o in desired.children if o["kind"] == "ConfigMap")
    worker_job = desired.job
    template = worker_job["spec"]["template"]
    pod = {
        "metadata": {
            "name": "tiny-worker-1-abcde",
            "namespace": "ns",
            "uid": "pod-uid",
            "labels": template["metadata"]["labels"],
            "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
            "ownerReferences": [{"kind": "Job", "uid": "job-uid"}],
        },
        "spec": {**template["spec"], "hostname": "tiny-worker-1", "nodeName": "cpu-node-0"},
    }
    kube = FakeKube(
        {
            ("ConfigMap", "tiny-config"): config_map,
            ("Secret", "hub"): {"data": {"token": base64.b64encode(b"s3cret").decode()}},
        }
    )
    runner = Runner(kube=kube, namespace="ns", workdir=tmp_path, kubeconfig="/k.yaml")  # type: ignore[arg-type]
    argv, env, _cwd = runner.prepare(pod)

    assert argv[:3] == ["python", "-m", "finetune_trainer.launch"]
    assert "--node-rank=1" in argv and "--nnodes=2" in argv
    assert "--master-addr=127.0.0.1" in argv
    port = runner.ports["job-uid"]
    assert f"--master-port={port}" in argv and port != 29500
    config_path = Path(argv[argv.index("--config") + 1])
    assert config_path.is_relative_to(tmp_path)
    config = json.loads(config_path.read_text())
    assert config["outputPath"].startswith(str(tmp_path)) and config["worldSize"] == 2

    assert env["NODE_RANK"] == "1" and env["FINETUNE_JOB_NAMESPACE"] == "ns"
    assert env["HF_TOKEN"] == "s3cret" and env["FINETUNE_DIST_BACKEND"] == "gloo"
    assert env["HF_HOME"].startswith(str(tmp_path))
    assert env["HOSTNAME"] == "tiny-worker-1" and env["KUBECONFIG"] == "/k.yaml"
    written = {e["name"] for e in template["spec"]["containers"][0]["env"]}
    assert written <= set(env) and set(env) - written == {"PATH", "LANG", "HOSTNAME", "KUBECONFIG"}
