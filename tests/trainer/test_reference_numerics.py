"""The fast path against an fp32 reference, on data a model can learn.

The same LoRA model takes two AdamW steps at the trainer's defaults (lr 3e-5, max_grad_norm
0.3) on the same batch three ways: fp32 eager (the reference), bf16 autocast eager (the
plain recipe's numerics) and bf16 autocast with the decoder layers compiled as the fast path
compiles them (`perf.optimize_model`; inductor runs on the CPU too). Every sequence starts
with the same template, so the first update is visible in the loss.

What a wrong fast path does: learn faster or slower than the reference after one update.
The bound is stated against the reference: the fast path's loss after the update may be no
further from the reference's than the plain bf16 loss is (plus a tenth of the reference's own
drop), and its drop may not exceed the reference's by more than that tenth.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from trainer_helpers import tiny_llama

from finetune_operator.api import DEFAULT_TARGET_MODULES
from finetune_trainer import perf

SLACK = 0.1  # of the reference's loss drop over the first update


@dataclass(frozen=True)
class Steps:
    losses: tuple[float, float]
    grad_norms: tuple[float, float]

    @property
    def drop(self) -> float:
        return self.losses[0] - self.losses[1]


def _base_model() -> Any:
    wider = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8}
    model = tiny_llama(vocab_size=512, num_key_value_heads=4, **wider)
    for parameter in model.parameters():  # the same weights in bf16 and fp32
        parameter.data = parameter.data.to(torch.bfloat16).float()
    return model


def _batch() -> torch.Tensor:
    """Eight sequences: a shared 48-token template, then 16 random tokens each."""
    generator = torch.Generator().manual_seed(1)
    template = torch.randint(3, 512, (48,), generator=generator)
    return torch.stack(
        [torch.cat([template, torch.randint(3, 512, (16,), generator=generator)]) for _ in range(8)]
    )


def _two_steps(base: Any, bf16: bool, compiled: bool) -> Steps:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base).to(torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(7)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=list(DEFAULT_TARGET_MODULES),
            task_type="CAUSAL_LM",
        ),
    )
    if compiled:
        perf.optimize_model(model, perf.PerfOptions(compile_layers=True, liger_loss=False))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.0)
    losses, norms = [], []
    ids = _batch()
    for _ in range(2):  # the second loss is the same batch's after one update
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.3)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return Steps((losses[0], losses[1]), (norms[0], norms[1]))


@pytest.mark.slow
def test_compiled_bf16_layers_learn_as_the_fp32_reference_does() -> None:
    base = _base_model()
    reference = _two_steps(base, bf16=False, compiled=False)
    plain = _two_steps(base, bf16=True, compiled=False)
    fast = _two_steps(base, bf16=True, compiled=True)

    assert reference.drop > 0, "the data must be learnable for this check to mean anything"
    slack = SLACK * reference.drop
    plain_distance = abs(plain.losses[1] - reference.losses[1])
    fast_distance = abs(fast.losses[1] - reference.losses[1])
    assert fast_distance <= plain_distance + slack, (reference, plain, fast)
    assert fast.drop <= reference.drop + slack, (reference, plain, fast)
    for step in range(2):
        plain_norm = abs(plain.grad_norms[step] - reference.grad_norms[step])
        fast_norm = abs(fast.grad_norms[step] - reference.grad_norms[step])
        assert fast_norm <= plain_norm + SLACK * reference.grad_norms[step], (
            reference,
            plain,
            fast,
        )
