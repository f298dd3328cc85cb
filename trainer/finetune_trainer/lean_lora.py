"""peft's LoRA linear forward without its per-adapter fp32 round trip.

peft keeps the adapter's weights in fp32 and, per adapter and per call, casts the input to
fp32, applies dropout in fp32, and (under autocast) casts it back to bf16 for the matmul; then
scales the adapter's output and adds it to the base output: five full-size elementwise
kernels per projection, twice over with checkpointing, and as many in the backward. In the
profile of a packed DPO micro-batch under CUDA graphs (H200, benchmarks/README.md) elementwise work
was a third of the GPU time, and most of it was this.

`install(model)` gives every plain peft `lora.Linear` a forward that, under autocast, does

    out = base(x);  out += scaling * dropout(x) @ A.T @ B.T

as dropout in the autocast dtype and one in-place GEMM that accumulates into the base output
(`addmm_`, beta 1, alpha = scaling): one elementwise kernel (the dropout) instead of five.
The values are peft's up to bf16 rounding: the bf16 -> fp32 -> bf16 round trip of the input is
exact, dropout computes in fp32 and rounds once either way, and the scale and add happen in
the GEMM's fp32 epilogue instead of two bf16 roundings. Dropout draws its mask from the same
generator (a bf16 mask is not bit-for-bit the fp32 one for the same seed: the same law).

Anything else falls through to peft's own forward: no autocast, several or disabled or merged
adapters, DoRA and the other variants, a LoRA bias, mixed-adapter batches, a base layer that
is not a plain `nn.Linear`.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, cast

import torch
import torch.nn.functional as F


def install(model: torch.nn.Module) -> int:
    """The lean forward on every plain peft `lora.Linear` in `model`; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear:
            module.forward = MethodType(_lean_forward, module)  # type: ignore[method-assign]
            count += 1
    return count


def _plain_adapter(layer: Any) -> str | None:
    """The one active adapter, when it is plain LoRA on and unmerged; else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name: str = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_B[name].bias is not None:
        return None
    return name


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    device_type = x.device.type
    name = None if args or kwargs else _plain_adapter(self)
    if (
        name is None
        or not torch.is_autocast_enabled(device_type)
        or x.dtype != torch.get_autocast_dtype(device_type)
    ):
        # peft's own (install gave this forward only to instances of exactly its class)
        return cast(torch.Tensor, type(self).forward(self, x, *args, **kwargs))
    flat = x.reshape(-1, x.shape[-1])
    # 2D: the base output is a fresh GEMM result (not a view), so adding in place is safe
    # for autograd (the base GEMM's backward needs its inputs, not its output)
    out = self.base_layer(flat)
    down = F.linear(self.lora_dropout[name](flat), self.lora_A[name].weight.to(x.dtype))
    up = self.lora_B[name].weight.to(out.dtype)
    out.addmm_(down, up.t(), alpha=self.scaling[name])
    return cast(torch.Tensor, out.view(*x.shape[:-1], out.shape[-1]))


__all__ = ["install"]
