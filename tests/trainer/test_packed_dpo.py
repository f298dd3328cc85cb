"""packed_dpo on the CPU: the packed loss and gradient are TRL DPOTrainer's, to fp32 rounding.

Speed is measured in benchmarks/train_throughput.py (--methods dpo), never here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from trainer_helpers import tiny_llama

from finetune_trainer import perf

pytest.importorskip("trl")

VOCAB = 97
TOL = 1e-4


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t2"
    )


def pairs(n: int, seed: int = 3) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)

    def text(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (length,), generator=g).tolist())

    return [
        {"prompt": text(3, 20), "chosen": f" {text(2, 15)} ", "rejected": f" {text(2, 15)} "}
        for _ in range(n)
    ]


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def base_model(seed: int = 0) -> Any:
    """A tiny fp32 Llama, padding with id 0, in training mode."""
    return tiny_llama(seed, vocab_size=VOCAB, pad_token_id=0).train()


def perturb_lora_b(model: Any) -> None:
    """LoRA B is zero at init (policy == reference); move it so the margin is real."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


def loss_and_grads(
    packed: bool, max_length: int | None = None, row_tokens: int = 4096
) -> tuple[float, list[torch.Tensor]]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    from finetune_trainer.packed_dpo import PackedDPOTrainer, PackedPreferenceCollator

    model = base_model()
    collator = (
        PackedPreferenceCollator(
            pad_token_id=0, max_length=max_length, pad_to_multiple_of=8, row_tokens=row_tokens
        )
        if packed
        else DataCollatorForPreference(pad_token_id=0, max_length=max_length)
    )
    trainer_class = PackedDPOTrainer if packed else DPOTrainer
    args = DPOConfig(
        output_dir="/tmp/packed-dpo-test",
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=3,
        beta=0.1,
        max_length=max_length,
        bf16=False,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs(3)),
        data_collator=collator,
        processing_class=tokenizer(),
        peft_config=LoraConfig(**LORA),  # as train.py does: the reference is the adapter off
    )
    perturb_lora_b(trainer.model)
    features = [trainer.train_dataset[i] for i in range(3)]
    inputs = trainer._prepare_inputs(collator(features))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
    return float(loss.detach()), grads


@pytest.mark.parametrize(("max_length", "row_tokens"), [(None, 4096), (24, 4096), (None, 30)])
def test_packed_dpo_matches_trl(max_length: int | None, row_tokens: int) -> None:
    """Same loss, same gradient as TRL's padded DPOTrainer (sigmoid loss, adapter-off
    reference), with and without truncation, in one row or several."""
    loss_trl, grads_trl = loss_and_grads(packed=False, max_length=max_length)
    loss_packed, grads_packed = loss_and_grads(
        packed=True, max_length=max_length, row_tokens=row_tokens
    )
    assert abs(loss_trl - 0.6931) > 1e-3  # policy != reference: a real margin
    assert abs(loss_packed - loss_trl) / abs(loss_trl) < TOL
    for a, b in zip(grads_packed, grads_trl, strict=True):
        assert (a - b).norm() <= TOL * b.norm() + 1e-8


def test_packed_preference_collator_layout() -> None:
    from finetune_trainer.packed_dpo import PackedPreferenceCollator

    features = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [10], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 2]},
    ]
    batch = PackedPreferenceCollator(pad_to_multiple_of=8)(features)
    # sequences: chosen 1 (5 tokens), chosen 2 (3), rejected 1 (4), rejected 2 (5); laid
    # longest first: 17 tokens, rounded to 24
    assert batch["input_ids"].shape == (1, 24)
    c1, c2, r1, r2 = [5, 6, 7, 8, 2], [10, 11, 2], [5, 6, 9, 2], [10, 12, 13, 14, 2]
    assert batch["input_ids"][0, :17].tolist() == c1 + r2 + r1 + c2
    assert batch["segments"][0, :17].tolist() == [0] * 5 + [3] * 5 + [2] * 4 + [1] * 3
    assert (batch["segments"][0, 17:] == -1).all()
    # only completion tokens are labels
    labels = batch["labels"][0].tolist()
    assert labels[:5] == [-100, -100, 7, 8, 2] and labels[5:10] == [-100, 12, 13, 14, 2]
    assert labels[14:17] == [-100, 11, 2]
    assert batch["position_ids"][0, :10].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    mask = batch["attention_mask"][0, 0]
    assert mask[6, 5] and not mask[5, 4]  # inside rejected 2; never across sequences
    assert batch["sequence_ids"].tolist() == [0, 1, 2, 3]
    rows = PackedPreferenceCollator(pad_to_multiple_of=8, row_tokens=9)(features)
    # rows of at most 9 tokens, first fit longest first: [c1 + r1] (9), [r2 + c2] (8) -> 16
    assert rows["input_ids"].shape == (2, 16)
    assert rows["segments"][:, 0].tolist() == [0, 3] and rows["segments"][1, 5].item() == 1


def test_fixed_width_rows_widen_only_to_the_longest_sequence() -> None:
    """Under CUDA graphs (`fixed_width`) every row is exactly as wide as the rows' capacity:
    `row_tokens`, or a longer sequence's length rounded up to `pad_to_multiple_of` (not a
    multiple of `row_tokens`: that doubled the widest graph set's memory)."""
    from finetune_trainer.packed_dpo import PackedPreferenceCollator

    short = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [10], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 2]},
    ]
    fixed = PackedPreferenceCollator(pad_to_multiple_of=2, row_tokens=16, fixed_width=True)
    # 5, 5, 4 fill 14 of the first row; 3 does not fit: a second row, both 16 wide
    assert fixed(short)["input_ids"].shape == (2, 16)
    loose = PackedPreferenceCollator(pad_to_multiple_of=2, row_tokens=16)
    assert loose(short)["input_ids"].shape == (2, 14)  # the longest row, rounded up to 2
    long = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11, 12, 2], "rejected_ids": [3, 2]}]
    fixed = PackedPreferenceCollator(pad_to_multiple_of=4, row_tokens=8, fixed_width=True)
    batch = fixed(long + short[1:])  # lengths 9, 6, 3, 5: capacity 12 (9 rounded up to 4)
    assert batch["input_ids"].shape == (2, 12)
    assert sorted(batch["segments"].unique().tolist()) == [-1, 0, 1, 2, 3]


def test_stable_gradients_accumulate_in_place() -> None:
    """perf.StableGradients: `.grad` are views of one buffer that backward adds into (what keeps
    gradient accumulation right under CUDA graphs), re-attached and zeroed after zero_grad."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(**LORA))
    perturb_lora_b(model)
    stable = perf.StableGradients(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, VOCAB, (1, 12))
    stable.attach()
    views = [p.grad for p in params]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    twice = [p.grad.clone() for p in params]
    assert all(p.grad is v for p, v in zip(params, views, strict=True))  # no adoption
    model.zero_grad(set_to_none=True)
    stable.attach()
    assert all(float(p.grad.abs().sum()) == 0.0 for p in params)
    model(input_ids=ids, labels=ids).loss.backward()
    for p, v, t in zip(params, views, twice, strict=True):
        assert p.grad is v
        assert torch.allclose(2 * p.grad, t, rtol=1e-5, atol=1e-7)


def test_sequence_logps_reads_only_the_label_logits() -> None:
    """The output layer sees only the positions whose next token is a label, and the sums
    are those of the full logits."""
    from finetune_trainer.packed_dpo import PackedPreferenceCollator, sequence_logps

    model = base_model()
    features = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 2], "rejected_ids": [11, 2]},
        {"prompt_ids": [12, 13], "chosen_ids": [14, 15, 16, 2], "rejected_ids": [17, 18, 2]},
    ]
    inputs = PackedPreferenceCollator(pad_to_multiple_of=8, row_tokens=12)(features)
    full = {k: v for k, v in inputs.items() if not k.startswith("label_")}
    widths: list[int] = []
    head = perf.causal_lm(model).get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: widths.append(out.shape[:-1].numel()))
    with torch.no_grad():
        picked, everything = sequence_logps(model, inputs), sequence_logps(model, full)
    handle.remove()
    labelled = int((inputs["labels"][:, 1:] != -100).sum())
    assert widths == [labelled, inputs["input_ids"].numel()] and labelled == 12
    assert torch.allclose(picked, everything, atol=1e-5)
