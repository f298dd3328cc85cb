"""Data: load rows (hub id or local JSON/JSONL/folder), check fields, tokenize, split, collate.

alpaca rows (instruction, input, output) become the alpaca-lora prompt + response, truncated
to cutoffLen, labels masked on the prompt unless trainOnInputs. dpo rows (prompt, chosen,
rejected) stay text: TRL's DPOTrainer tokenizes them; only the prompt is cut here to
dpo.maxPromptLength (TRL dropped that option).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_operator.api import DatasetFormat
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer.tiny import resolve_bundled

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The alpaca-lora template (templates/alpaca.json), as the seed recipe uses it.
PROMPT_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
REQUIRED_FIELDS = {
    DatasetFormat.ALPACA: ("instruction", "output"),  # input may be absent or empty
    DatasetFormat.DPO: ("prompt", "chosen", "rejected"),
}
_DATA_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """Bad or missing data. The message names the field and the file."""


def load_rows(name: str, revision: str | None = None) -> Any:
    """A `datasets.Dataset` from a hub id, a JSON/JSONL file or a folder of them."""
    import datasets

    name = resolve_bundled(name)
    path = Path(name)
    if path.is_file():
        files = [str(path)]
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _DATA_SUFFIXES)
        if not files:
            raise DataError(f"dataset folder {name} holds no .json or .jsonl files")
    elif path.is_absolute() or name.startswith("."):
        raise DataError(f"dataset {name}: no such file or folder")
    else:
        return datasets.load_dataset(name, revision=revision, split="train")
    return datasets.load_dataset("json", data_files=files, split="train")


def check_fields(rows: Any, data_format: DatasetFormat, source: str) -> None:
    missing = [f for f in REQUIRED_FIELDS[data_format] if f not in rows.column_names]
    if missing:
        raise DataError(
            f"dataset {source}: field(s) {', '.join(missing)} missing for format "
            f"{data_format.value} (needs {', '.join(REQUIRED_FIELDS[data_format])}; "
            f"found {', '.join(rows.column_names) or 'no fields'})"
        )


def alpaca_prompt(row: dict[str, Any]) -> str:
    if row.get("input"):
        return PROMPT_TEMPLATE["prompt_input"].format(**row)
    return PROMPT_TEMPLATE["prompt_no_input"].format(instruction=row["instruction"])


def alpaca_tokenizer(
    tokenizer: Any, cutoff_len: int, train_on_inputs: bool
) -> Callable[[dict[str, Any]], dict[str, list[int]]]:
    """The seed recipe's generate_and_tokenize_prompt: truncate, append EOS, mask the prompt."""

    def tokenize(text: str, add_eos: bool = True) -> list[int]:
        ids: list[int] = tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"]
        if add_eos and ids and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
            ids.append(tokenizer.eos_token_id)
        return ids

    def apply(row: dict[str, Any]) -> dict[str, list[int]]:
        prompt = alpaca_prompt(row)
        ids = tokenize(prompt + row["output"])
        labels = list(ids)
        if not train_on_inputs:
            prompt_len = len(tokenize(prompt, add_eos=False))
            labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return apply


def truncate_prompt(
    tokenizer: Any, max_prompt_length: int
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Keep the last maxPromptLength tokens of each dpo prompt (cut on token boundaries)."""

    def apply(row: dict[str, Any]) -> dict[str, Any]:
        encoded = tokenizer(row["prompt"], add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) > max_prompt_length:
            row = dict(row, prompt=row["prompt"][offsets[-max_prompt_length][0] :])
        return row

    return apply


def split(rows: Any, validation_size: int | float, seed: int) -> tuple[Any, Any | None]:
    """Train and validation sets; validationSize is a row count, a fraction, or 0 for none.

    A count larger than the data leaves too little to train on: then an error, as the seed
    recipe's train_test_split would raise, but saying which knob to turn.
    """
    if not validation_size:
        return rows, None
    if isinstance(validation_size, int) and validation_size >= len(rows):
        raise DataError(
            f"dataset.validationSize {validation_size} is not smaller than the data set "
            f"({len(rows)} rows): lower it, use a fraction, or 0 to turn evaluation off"
        )
    parts = rows.train_test_split(test_size=validation_size, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def build_datasets(config: ResolvedConfig, tokenizer: Any) -> tuple[Any, Any | None]:
    """Train and eval datasets, ready for the trainer of config.method."""
    rows = load_rows(config.dataset_name)
    check_fields(rows, config.dataset_format, config.dataset_name)
    train, evaluation = split(rows, config.validation_size, config.seed)
    if config.dataset_format is DatasetFormat.DPO:
        assert config.dpo is not None
        cut = truncate_prompt(tokenizer, config.dpo.max_prompt_length)
        keep = list(REQUIRED_FIELDS[DatasetFormat.DPO])
        train = train.select_columns(keep).map(cut)
        evaluation = None if evaluation is None else evaluation.select_columns(keep).map(cut)
        return train, evaluation
    fn = alpaca_tokenizer(tokenizer, config.cutoff_len, config.train_on_inputs)
    columns = rows.column_names
    train = train.map(fn, remove_columns=columns)
    evaluation = None if evaluation is None else evaluation.map(fn, remove_columns=columns)
    return train, evaluation


def build_collator(tokenizer: Any, pad_to_multiple_of: int, padding_free: bool) -> Any:
    """Right-padding DataCollatorForSeq2Seq, or flattening (no padding) where exact.

    Left padding (the seed's) leaves fully masked attention rows that gave NaN gradients in
    SDPA's cuDNN backward on an H200; right padding puts every query after its own tokens.
    Padding-free packs a micro-batch into one row with position_ids restarting per example;
    transformers turns those position ids into a block-diagonal mask for sdpa and into
    varlen kernels for flash attention, so the result equals the padded one (tested).
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        return DataCollatorWithFlattening(  # type: ignore[no-untyped-call]
            return_position_ids=True, separator_id=IGNORE_INDEX
        )
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(
        tokenizer,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
        padding=True,
        label_pad_token_id=IGNORE_INDEX,
    )
