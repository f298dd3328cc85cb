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
