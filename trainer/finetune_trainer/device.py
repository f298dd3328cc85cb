"""The one seam between the recipe and the hardware: device, distributed backend, vendor extras.

xpu -> `xccl` (PyTorch's own XPU collectives), or `ccl` where oneccl_bindings_for_pytorch
is installed; cuda -> nccl; cpu -> gloo. Intel's extras (intel_extension_for_pytorch,
oneccl_bindings_for_pytorch, ipex_llm) are used only when importable, never required.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

OOM_ADVICE = (
    "out of device memory: lower training.microBatchSize (accumulation grows, the global "
    "batch stays), lower training.cutoffLen, or set training.gradientCheckpointing: true"
)


# Test-only: "pretend this many devices of the requested kind are visible". The one hardware
# seam tests fake (there is no Intel GPU to count here): `device_count` returns it, and
# `select_device` then runs each rank on the CPU with gloo, so that the launcher, the
# rendezvous, the batch rule and the status report are exercised for real. Never set in a pod.
FAKE_DEVICE_COUNT_ENV = "FINETUNE_FAKE_DEVICE_COUNT"
# Stacks (tiles) per card: a Data Center GPU Max 1550 has two, which ZE_FLAT_DEVICE_HIERARCHY=
# FLAT exposes as two devices; Flex and Arc cards have one.
MAX_STACKS_PER_CARD = 2


class DeviceError(RuntimeError):
    """The requested device kind is not there. The message says what was found."""


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # xpu | cuda | cpu
    backend: str  # xccl | ccl | nccl | gloo
    local_rank: int

    @property
    def torch_device(self) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, self.local_rank)


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def found_devices() -> str:
    """What this process can see, for error messages."""
    seen = [f"cpu ({os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        seen.append(f"cuda x{torch.cuda.device_count()}")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        seen.append(f"xpu x{torch.xpu.device_count()}")
    return ", ".join(seen)


def _faked() -> int | None:
    value = os.environ.get(FAKE_DEVICE_COUNT_ENV)
    return int(value) if value else None


def device_count(kind: str) -> int:
    """Devices of `kind` this process can see (1 for cpu): the count a worker starts ranks by."""
    if kind == "cpu":
        return 1
    fake = _faked()
    if fake is not None:
        return fake
    return _count(kind)


def ranks_per_worker(kind: str, requested: int, visible: int) -> int:
    """How many ranks a worker given `requested` devices (devicesPerWorker) starts.

    xpu: one per device it sees, so a pod given two 2-stack Max cards (FLAT hierarchy: four
    devices) starts four; any mix of 1- and 2-stack cards gives between `requested` and
    MAX_STACKS_PER_CARD x `requested`. More than that means the pod sees cards it was not
    given (no device-plugin isolation): it keeps to `requested`, as do cuda (a GPU is one
    device) and cpu (devicesPerWorker processes). Fewer than requested is a DeviceError.
    """
    if kind == "cpu":
        return requested
    if visible == 0:
        raise DeviceError(f"device {kind} requested but none is visible; found: {found_devices()}")
    if visible < requested:
        raise DeviceError(
            f"devicesPerWorker is {requested} but this worker sees {visible} {kind} device(s): "
            "check the device plugin and the node's GPUs, or lower devicesPerWorker"
        )
    if kind == "xpu" and visible <= MAX_STACKS_PER_CARD * requested:
        return visible
    if visible > requested:
        log.warning(
            "%d %s devices visible but %d requested: starting %d ranks on the first %d",
            visible,
            kind,
            requested,
            requested,
            requested,
        )
    return requested


def _count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "xpu":
        if importable("intel_extension_for_pytorch"):
            # IPEX registers its kernels (and older XPU support) on import.
            importlib.import_module("intel_extension_for_pytorch")
        return torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    return 1


def select_device(
    kind: str, local_rank: int, local_world_size: int, requested_backend: str | None = None
) -> DeviceInfo:
    """Check that this process has its device and pick the collective backend for it."""
    if kind != "cpu" and _faked() is not None:
        log.warning(
            "%s is set (test only): %s device %d stands in as the CPU, backend gloo",
            FAKE_DEVICE_COUNT_ENV,
            kind,
            local_rank,
        )
        return DeviceInfo(kind="cpu", backend="gloo", local_rank=local_rank)
    if kind != "cpu":
        count = _count(kind)
        if count == 0:
            raise DeviceError(
                f"device {kind} requested but none is visible; found: {found_devices()}"
            )
        if local_rank >= count:
            raise DeviceError(
                f"local rank {local_rank} needs {kind}:{local_rank} but only {count} {kind} "
                f"device(s) are visible ({local_world_size} processes per worker); "
                "devicesPerWorker must not exceed the devices on the node"
            )
    if kind == "xpu":
        backend = "ccl" if importable("oneccl_bindings_for_pytorch") else "xccl"
        if backend == "ccl":
            importlib.import_module("oneccl_bindings_for_pytorch")  # registers "ccl"
    elif kind == "cuda":
        backend = "nccl"
    else:
        backend = "gloo"
    if (
        requested_backend
        and requested_backend != backend
        and not (requested_backend == "xccl" and backend == "ccl")
    ):
        log.warning(
            "FINETUNE_DIST_BACKEND=%s ignored: %s fits device %s here",
            requested_backend,
            backend,
            kind,
        )
    return DeviceInfo(kind=kind, backend=backend, local_rank=local_rank)


def ipex_llm_available() -> bool:
    """ipex-llm's low-bit QLoRA path, used only on XPU where it is installed."""
    return importable("ipex_llm")


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return any(
        sign in text
        for sign in (
            "out of memory",
            "ur_result_error_out_of_device_memory",
            "can't allocate memory",
        )
    )
