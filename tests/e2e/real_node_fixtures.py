"""A cluster of its own with a real node (``FTO_REAL_NODE=1 hack/dev-cluster up``), the images
from ``hack/build-images`` imported into it, and helpers to drive the chart and FinetuneJobs
in real containers there.

The real node is the machine itself (containerd, kubelet, kube-proxy, CoreDNS: see
hack/kwok/real-node.sh): one per machine, so this module's cluster has its own name
(``FTO_E2E_REAL_CLUSTER_NAME``) and is taken down after the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_cluster import (
    DEV_CLUSTER,
    REPO_ROOT,
    Cluster,
    missing_tools,
    running_under_ci,
    tools_path,
)

BUILD_IMAGES = REPO_ROOT / "hack" / "build-images"
CHART = REPO_ROOT / "charts" / "finetune-operator"
EXAMPLE = REPO_ROOT / "examples" / "tiny-cpu.yaml"
REAL_CLUSTER_NAME = os.environ.get("FTO_E2E_REAL_CLUSTER_NAME", "finetune-e2e-real")

REAL_NODE = os.environ.get("FTO_REAL_NODE_NAME", "real-node")
REAL_NODE_LABEL = "finetune.dev/real-node"
# Pods opt in to the real node: it is tainted, so that nothing else lands there.
REAL_NODE_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {REAL_NODE_LABEL: "true"},
    "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}
RELEASE = "finetune-operator"
RELEASE_NAMESPACE = "finetune-system"


@dataclass
class Images:
    operator: str
    trainer: str
    # The image IDs the node has for those names (`hack/dev-cluster image-id`): what pods report
    # as their containers' imageID. (podman's own IDs differ when saving converts an image to
    # the OCI format; the node keeps them as a label of each image it imported.)
    operator_id: str = ""
    trainer_id: str = ""


def image_tags() -> tuple[str, str]:
    out = subprocess.run(
        [str(BUILD_IMAGES), "--print-tags"], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], out[1]


def podman_image_id(image: str) -> str | None:
    result = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or None if result.returncode == 0 else None


def real_node_prerequisites() -> str:
    """Why this machine cannot run the real node; empty when it can."""
    if os.geteuid() != 0:
        return "the real node needs root"
    missing = [
        tool
        for tool in ("containerd", "ctr", "runc", "podman", "iptables", "busybox")
        if shutil.which(tool) is None
    ]
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append("containernetworking-plugins")
    return f"missing: {', '.join(missing)}" if missing else ""


def ensure_images() -> Images:
    """The images of hack/build-images, built here when missing (CI builds them beforehand)."""
    operator, trainer = image_tags()
    if podman_image_id(operator) is None or podman_image_id(trainer) is None:
        if running_under_ci():
            pytest.fail(f"images {operator} and {trainer} are not built: run hack/build-images")
        subprocess.run([str(BUILD_IMAGES)], check=True, timeout=7200)
    return Images(operator, trainer)


def dev_cluster(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        FTO_CLUSTER_NAME=REAL_CLUSTER_NAME,
        FTO_REAL_NODE="1",
        FTO_REAL_NODE_NAME=REAL_NODE,
        FTO_GPU_NODES="1",
        FTO_CPU_NODES="1",
    )
    return subprocess.run(
        [str(DEV_CLUSTER), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[tuple[Cluster, Images]]:
    if reason := real_node_prerequisites():
        if running_under_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    if running_under_ci() and (missing := missing_tools()):
        pytest.fail(f"cluster tools are not built and CI=true: run hack/build-tools.sh\n{missing}")
    images = ensure_images()
    up = dev_cluster("up")
    try:
        if up.returncode != 0:
            pytest.fail(f"hack/dev-cluster up failed (exit {up.returncode}):\n{up.stderr}")
        match = re.search(r"^export KUBECONFIG=(.+)$", up.stdout, re.MULTILINE)
        assert match, up.stdout
        cluster = Cluster(
            kubeconfig=Path(match.group(1).strip()), owned=True, name=REAL_CLUSTER_NAME
        )
        loaded = dev_cluster("load-image", images.operator, images.trainer, timeout=1800)
        assert loaded.returncode == 0, loaded.stderr
        images.operator_id, images.trainer_id = (
            dev_cluster("image-id", image, timeout=60).stdout.strip()
            for image in (images.operator, images.trainer)
        )
        assert images.operator_id.startswith("sha256:"), images
        assert images.trainer_id.startswith("sha256:"), images
        yield cluster, images
    finally:
        down = dev_cluster("down", timeout=300)
        assert down.returncode == 0, down.stderr


def helm(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["helm", *args], capture_output=True, text=True, env=cluster.env(), timeout=300
    )


def helm_install(cluster: Cluster, images: Images) -> subprocess.CompletedProcess[str]:
    """The chart as a user installs it, with the locally built images and the real node's
    placement (its nodeSelector and toleration)."""
    repository, tag = images.operator.rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "trainer": {"image": images.trainer, "imagePullPolicy": "Never"},
        "operator": {"logFormat": "text"},
        **REAL_NODE_PLACEMENT,
    }
    return subprocess.run(
        [
            "helm",
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "--values",
            "-",
            "--wait",
            "--timeout",
            "240s",
        ],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
        env=cluster.env(),
        timeout=300,
    )


def output_volume(namespace: str, claim: str, host_path: Path) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume on the real node and its claim, ReadWriteMany as the output
    of a multi-worker job must be. hostPath gets no fsGroup: the folder is made for uid 1000."""
    host_path.mkdir(parents=True, exist_ok=True)
    os.chown(host_path, 1000, 1000)
    storage = {"storage": "1Gi"}
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-output"},
            "spec": {
                "capacity": storage,
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "hostPath": {"path": str(host_path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "volumeName": f"{namespace}-output",
                "resources": {"requests": storage},
            },
        },
    ]


def tiny_job(namespace: str, claim: str, max_steps: int) -> dict[str, Any]:
    """examples/tiny-cpu.yaml as two 1-rank workers on the real node, output on the claim."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = namespace
    spec = manifest["spec"]
    spec.update({"workers": 2, "devicesPerWorker": 1, **REAL_NODE_PLACEMENT})
    spec["training"]["maxSteps"] = max_steps
    spec["output"] = {"volumeClaim": claim, "path": "/output"}
    return manifest


def progress_records(output: Path) -> list[dict[str, Any]]:
    """The trainer's JSON lines (progress.jsonl) on the output volume, every run appended."""
    records: list[dict[str, Any]] = []
    for path in output.rglob("progress.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


__all__ = [
    "REAL_NODE",
    "REAL_NODE_PLACEMENT",
    "RELEASE",
    "RELEASE_NAMESPACE",
    "Images",
    "helm",
    "helm_install",
    "output_volume",
    "progress_records",
    "real_cluster",
    "tiny_job",
    "tools_path",
]
