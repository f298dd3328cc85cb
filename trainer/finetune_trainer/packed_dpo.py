"""Padding-free DPO on TRL's DPOTrainer: what TRL lacks today, and nothing else.

TRL's DPOTrainer pads the chosen and rejected sequences of a micro-batch to the longest of
them (its own `padding_free` switch is disabled "after a refactor", TRL 1.x), so with
alpaca-like lengths a third or more of every forward is padding, and its loss code reads
metrics back to the host several times per micro-batch. Here:

* `PackedPreferenceCollator` lays the micro-batch's 2B sequences (chosen 1..B, then rejected
  1..B, TRL's order) end to end in rows of at most `row_tokens`: position ids restart per sequence, a 4D
  block-diagonal causal mask keeps attention inside each sequence (`perf.block_causal_mask`),
  `labels` are the completion tokens, `segments` says which sequence each token belongs to.
  Truncation is TRL's default (`keep_start` to `max_length`, per sequence).
* `PackedDPOTrainer._compute_loss` runs the reference (TRL's: the adapter off, or its "ref"
  copy; no grad) and the policy
  over the packed row, sums each sequence's completion log-probs with one `index_add`, and
  computes TRL's sigmoid loss, `-logsigmoid(beta * (policy - reference log-ratio margin))`
  averaged over the pairs: the same loss and gradient as DPOTrainer's (tests/trainer check
  it against the unpacked trainer). Reward margin and accuracy are kept on the device and read
  once per logging step.

Under graphs of the decoder stack (`cuda_graphs`, CUDA at any world size) the reference pass
replays the policy's own forward graph with the LoRA B matrices zeroed (B = 0 is the adapter
off, for plain LoRA): reference and policy then round alike, and the margin at the first step,
where they are one model, is exactly zero.

Anything else (other loss types, precomputed reference log-probs, a separate reference
model, weighting) goes to DPOTrainer's own code: the collator's `segments` key is the switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import use_adapter

from finetune_trainer.cuda_graphs import GraphedLayers, installed
from finetune_trainer.perf import (
    DPO_GRAPH_ROW_BUCKET,
    DPO_GRAPH_ROW_TOKENS,
    IGNORE_INDEX,
    block_causal_mask,
    causal_lm,
    decoder_layers,
    pack_rows_tightly,
)


@dataclass
class PackedPreferenceCollator:
    """Packed rows per micro-batch of preference pairs (see the module docstring).

    Sequences are laid into rows of at most `row_tokens` tokens, longest first, each into the
    first row with room: attention over a row costs its width squared, so long DPO sequences
    are not all packed into one row. Where a sequence is longer than `row_tokens`, the rows of
    that micro-batch hold up to its length rounded up to `pad_to_multiple_of`. The row width
    is the longest row rounded up to `pad_to_multiple_of` (a few shapes: what compiled layers
    see), or with `fixed_width` the rows' capacity itself (under CUDA graphs: a micro-batch's
    shape is then its row count, and a long sequence widens its micro-batch to its own
    rounded length, not to a multiple of `row_tokens`). Each row's pad tail is its own segment.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int = 64
    row_tokens: int = 4096
    fixed_width: bool = False

    @classmethod
    def for_training(
        cls, pad_token_id: int, max_length: int, cuda_graphs: bool
    ) -> PackedPreferenceCollator:
        """The rows the trainer uses (and the benchmark measures). Under CUDA graphs every
        row is DPO_GRAPH_ROW_TOKENS wide, or a longer sequence's length rounded up to
        DPO_GRAPH_ROW_BUCKET: a micro-batch's shape is its row count. Else rows of up to 4096
        tokens (or max_length), rounded up to 64."""
        if cuda_graphs:
            return cls(
                pad_token_id=pad_token_id,
                max_length=max_length,
                pad_to_multiple_of=DPO_GRAPH_ROW_BUCKET,
                row_tokens=DPO_GRAPH_ROW_TOKENS,
                fixed_width=True,
            )
        return cls(
            pad_token_id=pad_token_id, max_length=max_length, row_tokens=max(4096, max_length)
        )

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences: list[tuple[list[int], int]] = []  # (ids, prompt length), chosen then rejected
        for key in ("chosen_ids", "rejected_ids"):
            for example in examples:
                ids = list(example["prompt_ids"]) + list(example[key])
                if self.max_length is not None:
                    ids = ids[: self.max_length]
                sequences.append((ids, len(example["prompt_ids"])))
        multiple = max(self.pad_to_multiple_of, 1)
        lengths = [len(ids) for ids, _ in sequences]
        capacity = max(self.row_tokens, math.ceil(max(lengths) / multiple) * multiple, 1)
        rows = pack_rows_tightly(lengths, capacity)
        longest = max(sum(lengths[i] for i in row) for row in rows)
        width = capacity if self.fixed_width else int(math.ceil(longest / multiple) * multiple)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segments = torch.full(shape, -1, dtype=torch.long)  # which sequence; -1: pad
        for r, row in enumerate(rows):
            at = 0
            for index in row:
                ids, prompt_length = sequences[index]
                length = len(ids)
                tensor = torch.as_tensor(ids, dtype=torch.long)
                input_ids[r, at : at + length] = tensor
                # completion tokens only (the prompt, and the first token, are never predicted)
                start = at + max(min(prompt_length, length), 1)
                labels[r, start : at + length] = tensor[start - at :]
                position_ids[r, at : at + length] = torch.arange(length)
                segments[r, at : at + length] = index
                at += length
            position_ids[r, at:] = torch.arange(width - at)
        # where a next token is a label: the only logits the loss reads (about half the
        # tokens; the rest are prompt and padding), as flat indices into the rows
        predicted = labels[:, 1:] != IGNORE_INDEX
        rows_at, columns_at = predicted.nonzero(as_tuple=True)
        # the mask needs one id per segment within a row: pad (-1) is its own segment there
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": block_causal_mask(segments),
            "labels": labels,
            "segments": segments,
            "sequence_ids": torch.arange(len(sequences)),
            "label_positions": rows_at * width + columns_at,
            "label_targets": labels[:, 1:][predicted],
            "label_segments": segments[:, 1:][predicted],
        }


def sequence_logps(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs of each packed sequence: [2B], chosen first.

    With the collator's `label_positions`, the output layer sees only the hidden states whose
    next token is a label (a forward pre-hook picks them, inside the model's own forward and
    its autocast): the same logits for those tokens, without the (tokens x vocab) fp32
    logits, their softmax and their gradient for prompt and padding, which set DPO's peak
    memory."""
    positions = inputs.get("label_positions")
    head = causal_lm(model).get_output_embeddings() if positions is not None else None
    hook = None
    if head is not None:

        def pick(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0].flatten(0, 1).index_select(0, positions).unsqueeze(0), *args[1:])

        hook = head.register_forward_pre_hook(pick)
    try:
        outputs = model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
        )
    finally:
        if hook is not None:
            hook.remove()
    if hook is not None:
        logits = outputs.logits[0].float()
        labels, segments = inputs["label_targets"], inputs["label_segments"]
    else:
        logits = outputs.logits[:, :-1].flatten(0, 1).float()
        labels = inputs["labels"][:, 1:].flatten()
        segments = inputs["segments"][:, 1:].flatten().clamp(min=0)  # ignored tokens add 0
    token_logps = -F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    # Per-sequence sums through a one-hot mask and a column sum, not index_add: on CUDA
    # index_add adds with atomics in no fixed order, so the reference and the policy pass,
    # identical at step 1, summed differently and the margin was not zero (measured: the loss
    # 6e-5 off log 2). torch's reduction sums in a fixed order; not a matmul,
    # which TF32 would round. The mask is labels x 2B.
    one_hot = F.one_hot(segments, inputs["sequence_ids"].numel()).to(token_logps.dtype)
    return (token_logps.unsqueeze(1) * one_hot).sum(0)


def _graphed_layers(model: Any) -> GraphedLayers | None:
    layers = decoder_layers(model)
    return installed(layers[0]) if layers else None


def _plain_lora_b(model: Any) -> list[torch.Tensor]:
    """The active adapter's LoRA B matrices, if it is plain LoRA (B = 0 is then the adapter
    off; not so for DoRA's magnitudes); else none."""
    configs = getattr(model, "peft_config", {})
    if len(configs) != 1 or any(getattr(c, "use_dora", False) for c in configs.values()):
        return []
    return [p for name, p in model.named_parameters() if "lora_B" in name]


class PackedDPOTrainer(DPOTrainer):
    """DPOTrainer whose sigmoid loss runs on `PackedPreferenceCollator` rows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packed_stats: dict[str, torch.Tensor] = {}
        self._graph_reference: tuple[GraphedLayers | None, list[torch.Tensor]] | None = None

    def _packed_supported(self) -> bool:
        return (
            is_peft_model(self.accelerator.unwrap_model(self.model))
            and list(self.loss_types) == ["sigmoid"]
            and self.ld_alpha is None
            and not self.use_weighting
            and not self.precompute_ref_logps
            and self.ref_model is None
            and not self.aux_loss_enabled
        )

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if "segments" not in inputs or not self._packed_supported():
            return super()._compute_loss(model, inputs, return_outputs)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            # TRL's reference: the adapter switched off, or the initial copy "ref" when an
            # existing adapter is trained further. Under CUDA graphs of the decoder stack: the
            # policy's own graph with the LoRA B matrices zeroed (the same function: B = 0
            # is the adapter off), so reference and policy round alike (cuda_graphs says why).
            unwrapped = self.accelerator.unwrap_model(self.model)
            ref_adapter = "ref" if "ref" in unwrapped.peft_config else None
            if self._graph_reference is None:  # once: the graphs are installed after __init__
                self._graph_reference = (_graphed_layers(unwrapped), _plain_lora_b(unwrapped))
            graphed, lora_b = self._graph_reference
            if graphed is not None and ref_adapter is None and lora_b:
                with graphed.reference_pass(lora_b):
                    ref_chosen, ref_rejected = sequence_logps(self.model, inputs).chunk(2)
            else:
                with use_adapter(unwrapped, adapter_name=ref_adapter):
                    ref_chosen, ref_rejected = sequence_logps(self.model, inputs).chunk(2)
        chosen, rejected = sequence_logps(model, inputs).chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -F.logsigmoid(self.beta * margin).mean()
        mode = "train" if model.training else "eval"
        stats = torch.stack(
            [
                (self.beta * margin).detach().sum(),
                (margin > 0).float().sum(),
                torch.tensor(float(margin.numel()), device=margin.device),
            ]
        )
        self._packed_stats[mode] = self._packed_stats.get(mode, torch.zeros_like(stats)) + stats
        if return_outputs:  # evaluation: no logits to hand back (TRL's prediction_step)
            return loss, SimpleNamespace(logits=None, margin=margin.detach())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model is None or self.model.training else "eval"
        stats = self._packed_stats.pop(mode, None)
        if stats is not None:
            gathered = self.accelerator.reduce(stats, reduction="sum")
            margin_sum, correct, count = gathered.tolist()  # the one read-back per log
            prefix = "eval_" if mode == "eval" else ""
            if count:
                logs[f"{prefix}rewards/margins"] = margin_sum / count
                logs[f"{prefix}rewards/accuracies"] = correct / count
        super().log(logs, start_time)


__all__ = ["PackedDPOTrainer", "PackedPreferenceCollator", "sequence_logps"]
