"""Operator settings that shape the desired objects (flags and env of `finetune-operator run`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0-xpu"
FIELD_MANAGER = "finetune-operator"


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the desired objects depend on besides the FinetuneJob itself.

    Defaults: trainer image `DEFAULT_TRAINER_IMAGE`, rendezvous port 29500, image pull policy
    IfNotPresent, pods run as uid/gid 1000, all namespaces watched.
    """

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    rendezvous_port: int = 29500
    run_as_user: int = 1000
    # Resource name per device kind ("xpu", "cuda"), overriding api.DEFAULT_DEVICE_RESOURCE.
    device_resources: dict[str, str] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()
    # Labels added to every worker pod template. For tests only (e.g. the local control
    # plane's `finetune.dev/simulate=manual`); empty in production.
    extra_pod_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> OperatorSettings:
        namespaces = tuple(
            n.strip() for n in os.environ.get("FTO_NAMESPACES", "").split(",") if n.strip()
        )
        return cls(
            trainer_image=os.environ.get("FTO_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            image_pull_policy=os.environ.get("FTO_IMAGE_PULL_POLICY", "IfNotPresent"),
            device_resources=(
                {"xpu": os.environ["FTO_XPU_RESOURCE"]}
                if os.environ.get("FTO_XPU_RESOURCE")
                else {}
            ),
            namespaces=namespaces,
            extra_pod_labels=parse_labels(os.environ.get("FTO_EXTRA_POD_LABELS", "")),
        )


def parse_labels(text: str) -> dict[str, str]:
    """Labels from "k=v,k2=v2" (FTO_EXTRA_POD_LABELS)."""
    labels = {}
    for item in text.split(","):
        if item.strip():
            key, _, value = item.partition("=")
            labels[key.strip()] = value.strip()
    return labels
