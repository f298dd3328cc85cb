"""`microBatchSize: auto` in the trainer: the decision, the ranks' agreement, the probe wiring.

The probe's memory readings need a GPU: here they are injected (torch.cuda's peak-memory
counters and total memory replaced by a model of bytes per token), and nothing else is faked:
the forward+backward passes are real, on the tiny model, with the collators training uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_helpers import EXAMPLE

from finetune_operator.api import Method
from finetune_trainer import perf
from finetune_trainer.config import World, check_batch_rule, load_config
from finetune_trainer.device import DeviceInfo
from finetune_trainer.model import load_tokenizer, prepare_model
from finetune_trainer.plan import Capabilities, make_plan
from finetune_trainer.train import (
    MEMORY_FRACTION,
    RULE_LIMIT,
    decide_micro_batch,
    min_over_ranks,
    probe_micro_batch,
    probes_memory,
    rule_micro_batch,
    training_collator,
)

CPU = DeviceInfo(kind="cpu", backend="gloo", local_rank=0)
CUDA = DeviceInfo(kind="cuda", backend="nccl", local_rank=0)
XPU = DeviceInfo(kind="xpu", backend="xccl", local_rank=0)
BASE = 10_000_000  # "bytes" held before any activation
PER_TOKEN = 1_000  # "bytes" per token of the micro-batch


def world(n: int) -> World:
    return World(rank=0, local_rank=0, world_size=n, local_world_size=n)


def auto(config: Any, global_batch: int | None = None, **update: Any) -> Any:
    return config.model_copy(
        update={
            "micro_batch_size": "auto",
            "gradient_accumulation_steps": None,
            "global_batch_size": global_batch or config.global_batch_size,
            **update,
        }
    )


class FakeMemory:
    """torch.cuda's memory counters as a linear model of the tokens a step computed on."""

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.peak = 0
        self.steps: list[int] = []

    def record(self, m: int, tokens: int) -> None:
        self.steps.append(m)
        self.peak = BASE + PER_TOKEN * tokens

    def install(self, patch: Any) -> None:
        cuda: Any = torch.cuda
        patch(cuda, "empty_cache", lambda: None)
        patch(cuda, "reset_peak_memory_stats", lambda: None)
        patch(cuda, "synchronize", lambda: None)
        patch(cuda, "max_memory_allocated", lambda: self.peak)
        patch(cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=self.total))


@pytest.fixture(scope="module")
def config() -> Any:
    return load_config(EXAMPLE, output="/tmp/unused")


def test_which_devices_and_methods_are_probed(config: Any) -> None:
    assert probes_memory(auto(config), CUDA)
    assert probes_memory(auto(config), XPU)
    assert probes_memory(auto(config, method=Method.FULL), CUDA)
    assert not probes_memory(auto(config), CPU)  # gloo: no memory probe
    assert not probes_memory(auto(config, method=Method.DPO), CUDA)  # pairs: not measured
    assert not probes_memory(config, CUDA)  # a fixed micro-batch is never probed


def test_rule_without_a_probe_keeps_the_global_batch(config: Any) -> None:
    """CPU and DPO: the largest divisor of the per-rank share up to RULE_LIMIT."""
    for global_batch, size, expected in ((8, 2, 4), (128, 2, 4), (6, 2, 3), (8, 8, 1), (5, 1, 1)):
        chosen = rule_micro_batch(auto(config, global_batch), world(size), CPU)
        assert chosen.micro_batch_size == expected <= RULE_LIMIT
        assert chosen.gradient_accumulation_steps == global_batch // size // expected
        check_batch_rule(chosen, world(size))
    dpo = rule_micro_batch(auto(config, 128, method=Method.DPO), world(4), CUDA)
    assert (dpo.micro_batch_size, dpo.gradient_accumulation_steps) == (4, 8)


def test_decision_is_the_largest_candidate_within_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = FakeMemory()
    memory.install(monkeypatch.setattr)

    def step(m: int) -> None:
        memory.record(m, m * 256)

    for budget_examples, expected in ((16, 16), (20, 16), (31, 16), (32, 32), (1000, 64), (3, 2)):
        memory.steps.clear()
        budget = BASE + PER_TOKEN * 256 * budget_examples
        choice = decide_micro_batch(128, 2, step, budget)
        assert choice.how == "probe" and choice.budget == budget
        assert choice.micro == expected, (budget_examples, choice)
        assert choice.micro in perf.candidate_micro_batches(128, 2)
        assert choice.micro * choice.accumulation * 2 == 128  # global batch unchanged
        assert memory.steps[:2] == [2, 4]  # measured at 2 and 4, then extrapolated
        assert choice.peaks.get(choice.micro, 0) <= budget  # the chosen size, if measured, fits
    # agreement hook: the ranks' minimum wins, accumulation follows it
    choice = decide_micro_batch(128, 2, step, BASE + PER_TOKEN * 256 * 64, agree=lambda m: 8)
    assert (choice.micro, choice.accumulation) == (8, 8)
    # no probe: the rule
    rule = decide_micro_batch(128, 2, None)
    assert (rule.how, rule.micro, rule.accumulation, rule.budget) == ("rule", 4, 16, None)


def _rank(rank: int, store: str, out: str, fits: list[int]) -> None:
    """One of two gloo processes: its own device memory allows fits[rank] examples."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    memory = FakeMemory()
    memory.install(setattr)

    def step(m: int) -> None:
        memory.record(m, m * 256)

    budget = BASE + PER_TOKEN * 256 * fits[rank]
    choice = decide_micro_batch(
        128, 2, step, budget, agree=lambda m: min_over_ranks(m, torch.device("cpu"))
    )
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"micro": choice.micro, "accumulation": choice.accumulation})
    )
    dist.destroy_process_group()


def test_ranks_agree_on_the_minimum_over_two_gloo_processes(tmp_path: Path) -> None:
    """Rank 0's memory fits 16, rank 1's only 4: both train at 4 (x accumulation 16)."""
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path), [16, 4]), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [{"micro": 4, "accumulation": 16}] * 2


@pytest.mark.parametrize("padding_free", [True, False], ids=["packed", "padded"])
def test_probe_runs_the_real_model_and_collator(
    config: Any, monkeypatch: pytest.MonkeyPatch, padding_free: bool
) -> None:
    """probe_micro_batch as build_trainer calls it (CUDA's collator), on the tiny model.

    The collators make every worst-case example cutoffLen tokens (packed rows of 1024, or
    padded rows of 256), so the injected peak is BASE + PER_TOKEN x 256 x m; the device's
    total memory is set so that 16 examples fit the budget and 32 do not.
    """
    cfg = auto(config, 64, padding_free=padding_free)
    tokenizer = load_tokenizer(cfg)
    model = prepare_model(cfg, CPU)
    plan = make_plan(cfg, "cuda", 1, Capabilities())
    inner = training_collator(cfg, tokenizer, plan)
    collator = perf.HostTokenCounter(inner)
    assert isinstance(inner, perf.PackingCollator) == padding_free
    if padding_free:
        assert inner.row_tokens == 1024

    trainable = [p for p in model.parameters() if p.requires_grad]
    reserve = sum(p.numel() * (8 + p.element_size()) for p in trainable)  # AdamW + grads
    memory = FakeMemory(int((BASE + PER_TOKEN * 256 * 20 + reserve) / MEMORY_FRACTION))
    memory.install(monkeypatch.setattr)
    seen: list[int] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        tokens = kwargs["input_ids"].numel()
        seen.append(tokens)
        memory.record(len(seen), tokens)
        assert module.training

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    model.eval()
    try:
        chosen = probe_micro_batch(cfg, CUDA, world(1), model, inner)
    finally:
        handle.remove()
    assert seen == [2 * 256, 4 * 256, 16 * 256]  # 2 and 4 measured, 16 confirmed
    assert (chosen.micro_batch_size, chosen.gradient_accumulation_steps) == (16, 4)
    assert chosen.global_batch_size == 64
    check_batch_rule(chosen, world(1))
    assert not model.training  # mode restored
    assert all(p.grad is None for p in trainable)  # the probe leaves no gradients
    assert collator.tokens == 0  # probe batches are not counted as trained tokens
