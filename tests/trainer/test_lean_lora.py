"""lean_lora on the CPU: peft's LoRA forward and gradients, to bf16 rounding, without its casts.

Its speed is measured in benchmarks/train_throughput.py (DPO), never here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from trainer_helpers import tiny_llama

from finetune_trainer import lean_lora

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dropout: float = 0.0) -> Any:
    """A tiny bf16 Llama with a LoRA adapter (fp32, as peft keeps it) whose B is not zero."""
    base = tiny_llama().to(torch.bfloat16).train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    model = peft.get_peft_model(base, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model


def logits_and_grads(model: Any, ids: torch.Tensor, autocast: bool = True) -> tuple[Any, Any]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


IDS = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(2))


def test_same_logits_and_adapter_gradients_as_peft() -> None:
    reference = lora_model()
    want_logits, want_grads = logits_and_grads(reference, IDS)
    lean = lora_model()
    assert lean_lora.install(lean) == 2 * len(TARGETS)
    got_logits, got_grads = logits_and_grads(lean, IDS)
    # bf16: peft rounds the adapter's output, its scaled copy and the sum; the GEMM once
    assert torch.allclose(got_logits, want_logits, rtol=0, atol=0.05)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        scale = want.abs().max().item()
        assert (got_grads[name] - want).abs().max().item() <= 0.03 * scale + 1e-6, name


def test_adapter_contribution_is_there() -> None:
    """Not a forward that just drops the adapter: with B not zero the output moves."""
    model = lora_model()
    lean_lora.install(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = model(input_ids=IDS).logits
        with model.disable_adapter():
            off = model(input_ids=IDS).logits
    assert (on - off).abs().max().item() > 0.05


def test_dropout_applies_to_the_adapter_input() -> None:
    """Dropout 1 zeroes the adapter's input in training: the output is the base model's."""
    model = lora_model(dropout=1.0)
    lean_lora.install(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    assert torch.equal(trained, base)


def test_falls_through_to_peft_without_autocast_or_with_the_adapter_off() -> None:
    reference, lean = lora_model(), lora_model()
    lean_lora.install(lean)
    want, _ = logits_and_grads(reference, IDS, autocast=False)
    got, _ = logits_and_grads(lean, IDS, autocast=False)
    assert torch.equal(got, want)  # peft's own code, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with reference.disable_adapter():
            want = reference(input_ids=IDS).logits
        with lean.disable_adapter():
            got = lean(input_ids=IDS).logits
    assert torch.equal(got, want)
