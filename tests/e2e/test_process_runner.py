"""The local process runner's kubelet duties, without a cluster: env, $(VAR), paths, ports.
(Under tests/e2e with the runner itself, so they run in the e2e group; they need no cluster.)"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from process_runner import Runner, expand, field_value, map_paths

from finetune_operator.objects import JobRef, build_desired_objects
from finetune_operator.resolve import parse_spec, resolve
from finetune_operator.settings import OperatorSettings


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
