"""perf.py on the CPU: packing is exact, the switches keep the math, auto micro-batch obeys the rule.

Speed is measured in benchmarks/, never here. Tolerances: fp32 on the CPU, so packed and
padded attention agree to ~1e-6 relative (different reduction orders only); we assert 1e-4.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from trainer_helpers import examples, rel, tiny_llama

from finetune_operator.api import DEFAULT_TARGET_MODULES
from finetune_trainer import perf

TOL = 1e-4


def padded(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What DataCollatorForSeq2Seq does with right padding (pad id 0, labels -100)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Token-summed loss over the batch's label tokens (as Trainer's num_items_in_batch does)."""
    model.zero_grad(set_to_none=True)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    out = model(**batch, num_items_in_batch=torch.tensor(n_items))
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return float(out.loss.detach()), grads


def test_pack_rows_in_order_and_bounded() -> None:
    rows = perf.pack_rows([5, 5, 5, 12, 1, 1], row_tokens=10)
    assert rows == [[0, 1], [2], [3], [4, 5]]
    assert [i for row in rows for i in row] == list(range(6))


def test_pack_rows_tightly_first_fit_longest_first() -> None:
    rows = perf.pack_rows_tightly([5, 5, 5, 12, 1, 4], row_tokens=10)
    assert rows == [[3], [0, 1], [2, 5, 4]]  # in-order packing needs 4 rows
    assert sorted(i for row in rows for i in row) == list(range(6))


def test_collator_layout() -> None:
    feats = examples(3)
    batch = perf.PackingCollator(pad_token_id=0, pad_to_multiple_of=16)(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape[0] == 1 and width % 16 == 0 and width >= sum(lengths)
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    for s, n in zip(starts, lengths, strict=True):
        assert batch["position_ids"][0, s : s + n].tolist() == list(range(n))
        assert int(batch["labels"][0, s]) == -100  # never predicted across examples
    mask = batch["attention_mask"][0, 0]
    assert mask.shape == (width, width) and bool(mask.diagonal().all())  # no fully masked row
    # token of example 1 cannot see example 0
    assert not bool(mask[starts[1], starts[1] - 1])
    assert bool(mask[starts[1] + 1, starts[1]])


@pytest.mark.parametrize("row_tokens", [None, 60])
def test_packed_equals_padded_loss_and_grad(row_tokens: int | None) -> None:
    model = tiny_llama()
    feats = examples(6)
    loss_pad, g_pad = loss_and_grads(model, padded(feats))
    packed = perf.PackingCollator(pad_token_id=0, pad_to_multiple_of=8, row_tokens=row_tokens)(
        feats
    )
    if row_tokens is not None:
        assert packed["input_ids"].shape[0] > 1
    loss_pack, g_pack = loss_and_grads(model, packed)
    assert abs(loss_pack - loss_pad) / abs(loss_pad) < TOL
    assert len(g_pack) == len(g_pad)
    assert max(rel(a, b) for a, b in zip(g_pack, g_pad, strict=True)) < TOL


def test_packed_equals_padded_with_lora_and_peft() -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=list(DEFAULT_TARGET_MODULES),
        task_type="CAUSAL_LM",
        init_lora_weights="gaussian",  # B != 0: A and B both get grads
    )
    model = get_peft_model(base, config)
    feats = examples(4, seed=3)
    loss_pad, g_pad = loss_and_grads(model, padded(feats))
    loss_pack, g_pack = loss_and_grads(model, perf.PackingCollator(pad_to_multiple_of=8)(feats))
    assert abs(loss_pack - loss_pad) / abs(loss_pad) < TOL
    assert max(rel(a, b) for a, b in zip(g_pack, g_pad, strict=True)) < TOL


def test_transformers_position_id_packing_agrees() -> None:
    """Cross-check: transformers' own flattening collator (position-id detection, sdpa) gives
    the same loss as ours, so either path is exact on this transformers version."""
    from transformers import DataCollatorWithFlattening

    model = tiny_llama()
    feats = examples(4, seed=5)
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(
        [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats]
    )
    loss_flat, _ = loss_and_grads(model, {k: v for k, v in flat.items() if k != "attention_mask"})
    loss_ours, _ = loss_and_grads(model, perf.PackingCollator(pad_to_multiple_of=8)(feats))
    assert abs(loss_flat - loss_ours) / abs(loss_ours) < TOL


def test_position_id_packing_needs_use_cache_off() -> None:
    """A trap in transformers 5: with config.use_cache True the forward makes a DynamicCache,
    and the packed-sequence detection (only when past_key_values is None) silently switches
    off, so flattened examples attend across each other. Our 4D mask does not depend on it."""
    from transformers import DataCollatorWithFlattening

    model = tiny_llama()
    feats = examples(4, seed=5)
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(
        [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats]
    )
    loss_pad, _ = loss_and_grads(model, padded(feats))
    model.config.use_cache = True
    loss_flat_cache, _ = loss_and_grads(model, dict(flat))
    loss_ours_cache, _ = loss_and_grads(model, perf.PackingCollator(pad_to_multiple_of=8)(feats))
    assert abs(loss_flat_cache - loss_pad) / abs(loss_pad) > 1e-3  # leaks across examples
    assert abs(loss_ours_cache - loss_pad) / abs(loss_pad) < TOL


def test_compiled_layers_same_loss_and_grad() -> None:
    """Regional torch.compile (inductor on the CPU here) keeps the math; two lengths, one graph."""
    model = tiny_llama()
    reference = copy.deepcopy(model)
    n = perf.compile_decoder_layers(model)
    assert n == 2
    collate = perf.PackingCollator(pad_to_multiple_of=8)
    for seed in (7, 8):  # two different packed lengths: dynamic shapes, no failure
        batch = collate(examples(3, seed=seed))
        loss_c, g_c = loss_and_grads(model, batch)
        loss_r, g_r = loss_and_grads(reference, batch)
        assert abs(loss_c - loss_r) / abs(loss_r) < TOL
        assert max(rel(a, b) for a, b in zip(g_c, g_r, strict=True)) < 1e-3


def test_candidate_micro_batches_keep_the_batch_rule() -> None:
    for world in (1, 2, 4, 8):
        for m in perf.candidate_micro_batches(128, world):
            assert (128 // world) % m == 0
    assert perf.candidate_micro_batches(128, 2) == [1, 2, 4, 8, 16, 32, 64]


def test_auto_micro_batch_picks_largest_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory model: 10 + 3 per example (GiB-like units); budget 60 -> 16 of {..,16,32,64}."""
    peaks: dict[str, int] = {}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peaks["now"])

    def step(m: int) -> None:
        if 10 + 3 * m > 80:
            raise torch.OutOfMemoryError("fake")
        peaks["now"] = 10 + 3 * m

    choice, measured = perf.auto_micro_batch(step, 128, 2, memory_budget=60)
    assert choice == 16 and 2 in measured and 4 in measured
    assert (128 // 2) % choice == 0


def test_host_token_counter_counts_without_the_device() -> None:
    feats = examples(5, seed=11)
    collate = perf.HostTokenCounter(perf.PackingCollator(pad_to_multiple_of=8))
    batch = collate(feats[:3])
    collate(feats[3:])
    assert collate.tokens == sum(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape[0] == 1

    class State:
        num_input_tokens_seen = 0

    state = State()
    collate.callback(world_size=2).on_step_end(None, state, None)
    assert state.num_input_tokens_seen == 2 * collate.tokens


def test_trimmed_trainer_counts_the_same_flops_and_still_switches_modes(tmp_path: Any) -> None:
    """trim_repeated_host_work: Trainer's FLOP count unchanged; train() skipped only when
    every module already is in the mode asked for, so eval/train switches still happen."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    batch = perf.PackingCollator(pad_to_multiple_of=8)(examples(3))
    expected = Trainer.floating_point_ops(trainer, batch)
    assert expected > 0
    perf.trim_repeated_host_work(trainer)
    assert trainer.floating_point_ops(batch) == expected
    assert trainer.floating_point_ops({"labels": batch["labels"]}) == 0

    model.train()
    assert all(m.training for m in model.modules())
    model.eval()  # PeftModel.eval -> our train(False): the full walk
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    # one submodule switched behind the trimmed method's back is still seen
    next(iter(model.base_model.model.model.layers)).eval()
    model.train()
    assert all(m.training for m in model.modules())
