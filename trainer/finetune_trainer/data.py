"""Data: load rows (hub id or local JSON/JSONL/folder), check fields, tokenize, split, collate.

alpaca rows (instruction, input, output) become the alpaca-lora prompt + response, truncated
to cutoffLen, labels masked on the prompt unless trainOnInputs. dpo rows (prompt, chosen,
rejected) stay text: TRL's DPOTrainer tokenizes them; only the prompt is cut here to
dpo.maxPromptLength (TRL dropped that option).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_operator.api import DatasetFormat
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer.tiny import resolve_bundled

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The alpaca-lora template (templates/alpaca.json), as IPEX-LLM's alpaca example uses it.
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


class SourceUnreachable(RuntimeError):
    """The hub is not reachable and the model/data set is not cached: not the spec's fault."""


def data_files(name: str) -> list[str] | None:
    """The local JSON/JSONL files a dataset name means; None for a hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _DATA_SUFFIXES)
        if not files:
            raise DataError(
                f"dataset folder {name} holds no .json or .jsonl files: point dataset.name at "
                "a data file or a folder of them"
            )
        return files
    if path.is_absolute() or name.startswith((".", "~")):
        raise DataError(
            f"dataset {name}: no such file or folder on this machine: fix dataset.name (a "
            "local .json/.jsonl file or folder, or a hub id such as yahma/alpaca-cleaned)"
        )
    return None


def load_rows(name: str, revision: str | None = None) -> Any:
    """A `datasets.Dataset` from a hub id, a JSON/JSONL file or a folder of them."""
    import datasets

    datasets.disable_progress_bars()  # a bar per map/filter of a few rows says nothing
    name = resolve_bundled(name)
    files = data_files(name)
    if files is None:
        try:
            return datasets.load_dataset(name, revision=revision, split="train")
        except datasets.exceptions.DatasetNotFoundError as error:
            raise DataError(
                f"dataset {name}: no such data set on the hub, or it is gated ({error}): fix "
                "dataset.name (a hub id, or a local .json/.jsonl file or folder starting with / "
                "or ./)"
            ) from None
        except ConnectionError as error:
            raise SourceUnreachable(
                f"dataset {name}: the hub cannot be reached from here and the data set is not "
                f"in the local cache ({error}); check the network (or HF_DATASETS_OFFLINE), or "
                "give a local file"
            ) from None
    try:
        return datasets.load_dataset("json", data_files=files, split="train")
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        text = " ".join(str(cause).split())[:300]
        raise DataError(
            f"dataset {name} could not be read as a table ({type(cause).__name__}: {text}): "
            "give every field the same type in every row (text, or null where allowed)"
        ) from None


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
    """IPEX-LLM's alpaca example's generate_and_tokenize_prompt: truncate, append EOS, mask the prompt."""

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


def training_rows(count: int, validation_size: int | float) -> int:
    """Rows left to train on once validationSize rows are held out (as train_test_split)."""
    if isinstance(validation_size, int) and validation_size >= count:
        raise DataError(
            f"dataset.validationSize {validation_size} is not smaller than the data set "
            f"({count} rows): lower it, use a fraction, or 0 to turn evaluation off"
        )
    held = (
        validation_size if isinstance(validation_size, int) else math.ceil(validation_size * count)
    )
    return count - held


def split(rows: Any, validation_size: int | float, seed: int) -> tuple[Any, Any | None]:
    """Train and validation sets; validationSize is a row count, a fraction, or 0 for none.

    A count larger than the data leaves too little to train on: then an error, as the
    train_test_split of IPEX-LLM's example would raise, but saying which knob to turn.
    """
    if not validation_size:
        return rows, None
    training_rows(len(rows), validation_size)
    parts = rows.train_test_split(test_size=validation_size, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_rows(rows: Any, data_format: DatasetFormat, source: str) -> None:
    """Every row's fields are text (a local file was already checked line by line)."""
    from finetune_trainer.checks import check_row

    if len(rows) == 0:
        raise DataError(f"dataset {source} holds no rows: give a data set with at least one row")
    for number, row in enumerate(rows, 1):
        check_row(row, data_format, f"dataset {source}: row {number}")


def too_few(config: ResolvedConfig, kept: int, dropped: int, unit: str) -> None:
    """Fewer training examples than one global batch: not one full step of data."""
    if kept >= config.global_batch_size:
        return
    raise DataError(
        f"dataset {config.dataset_name}: {kept} training {unit} left (after "
        f"dataset.validationSize {config.validation_size}"
        + (f" and {dropped} dropped by the length limits" if dropped else "")
        + f"), fewer than one global batch of {config.global_batch_size}: add rows, lower "
        "training.globalBatchSize, or lower dataset.validationSize"
    )


def _alpaca_datasets(
    config: ResolvedConfig, tokenizer: Any, train: Any, evaluation: Any | None
) -> tuple[Any, Any | None]:
    """Tokenized alpaca rows; rows with no label token within cutoffLen dropped and counted."""
    fn = alpaca_tokenizer(tokenizer, config.cutoff_len, config.train_on_inputs)
    eos = tokenizer.eos_token_id

    def counted(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = fn(row)
        ids = out["input_ids"]
        out["_labelled"] = sum(1 for label in out["labels"] if label != IGNORE_INDEX)
        out["_cut"] = len(ids) >= config.cutoff_len and (not ids or ids[-1] != eos)
        return out

    columns = train.column_names
    train = train.map(counted, remove_columns=columns)
    kept_train = train.filter(lambda row: row["_labelled"] > 0)
    dropped, cut = len(train) - len(kept_train), sum(train["_cut"])
    how = "raise training.cutoffLen" + (
        "" if config.train_on_inputs else " or set dataset.trainOnInputs: true"
    )
    if len(kept_train) == 0:
        raise DataError(
            f"dataset {config.dataset_name}: no training row has a response token within "
            f"training.cutoffLen {config.cutoff_len} (the prompt template and instruction fill "
            f"it), so every label is masked and nothing would be trained: {how}"
        )
    if evaluation is not None:
        evaluation = evaluation.map(counted, remove_columns=columns)
        evaluation = evaluation.filter(lambda row: row["_labelled"] > 0)
        if len(evaluation) == 0:
            raise DataError(
                f"dataset {config.dataset_name}: no validation row has a response token within "
                f"training.cutoffLen {config.cutoff_len}, so the eval loss would be over "
                f"nothing: {how}, or set dataset.validationSize: 0"
            )
        evaluation = evaluation.remove_columns(["_labelled", "_cut"])
    if _is_main() and (dropped or cut):
        log.warning(
            "data: %d of %d training rows dropped (no response token within cutoffLen %d) and "
            "%d cut at cutoffLen (response truncated): %s to keep them whole",
            dropped,
            len(train),
            config.cutoff_len,
            cut,
            how,
        )
    too_few(config, len(kept_train), dropped, "rows")
    return kept_train.remove_columns(["_labelled", "_cut"]), evaluation


def _dpo_lengths(tokenizer: Any, max_length: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Per row, as TRL's DPOTrainer will see it: dropped (the prompt alone fills maxLength,
    TRL filters such rows) or cut (prompt + chosen/rejected longer than maxLength)."""
    eos = tokenizer.eos_token or ""

    def apply(row: dict[str, Any]) -> dict[str, Any]:
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        longest = max(
            len(tokenizer(row["prompt"] + row[answer])["input_ids"])
            + (0 if row[answer].endswith(eos) else 1)  # TRL appends EOS
            for answer in ("chosen", "rejected")
        )
        return {"_dropped": prompt >= max_length, "_cut": longest > max_length}

    return apply


def _dpo_datasets(
    config: ResolvedConfig, tokenizer: Any, train: Any, evaluation: Any | None
) -> tuple[Any, Any | None]:
    """Prompts cut to maxPromptLength; rows TRL would drop are dropped here, and counted."""
    assert config.dpo is not None
    cut_prompt = truncate_prompt(tokenizer, config.dpo.max_prompt_length)
    lengths = _dpo_lengths(tokenizer, config.dpo.max_length)
    keep = list(REQUIRED_FIELDS[DatasetFormat.DPO])
    how = "raise dpo.maxLength or lower dpo.maxPromptLength (it must leave room for a response)"

    def prepared(rows: Any) -> tuple[Any, int, int]:
        rows = rows.select_columns(keep).map(cut_prompt).map(lengths)
        kept = rows.filter(lambda row: not row["_dropped"])
        return kept.remove_columns(["_dropped", "_cut"]), len(rows) - len(kept), sum(rows["_cut"])

    total = len(train)
    train, dropped, cut = prepared(train)
    if len(train) == 0:
        raise DataError(
            f"dataset {config.dataset_name}: all {total} training rows dropped: each prompt "
            f"alone fills dpo.maxLength {config.dpo.max_length} tokens, leaving no response "
            f"to compare: {how}"
        )
    if evaluation is not None:
        evaluation, _, _ = prepared(evaluation)
        if len(evaluation) == 0:
            raise DataError(
                f"dataset {config.dataset_name}: every validation row's prompt fills "
                f"dpo.maxLength {config.dpo.max_length} tokens: {how}, or set "
                "dataset.validationSize: 0"
            )
    if _is_main() and (dropped or cut):
        log.warning(
            "data: %d of %d training rows dropped (prompt fills maxLength %d) and %d cut at "
            "maxLength (response truncated): %s to keep them whole",
            dropped,
            total,
            config.dpo.max_length,
            cut,
            how,
        )
    too_few(config, len(train), dropped, "pairs")
    return train, evaluation


def build_datasets(config: ResolvedConfig, tokenizer: Any) -> tuple[Any, Any | None]:
    """Train and eval datasets, ready for the trainer of config.method.

    A data set that would train on nothing is an error: no row with a label token, every
    DPO row dropped by the length limits, or fewer rows than one global batch.
    """
    rows = load_rows(config.dataset_name)
    check_fields(rows, config.dataset_format, config.dataset_name)
    check_rows(rows, config.dataset_format, config.dataset_name)
    train, evaluation = split(rows, config.validation_size, config.seed)
    if config.dataset_format is DatasetFormat.DPO:
        return _dpo_datasets(config, tokenizer, train, evaluation)
    return _alpaca_datasets(config, tokenizer, train, evaluation)


def build_collator(tokenizer: Any, pad_to_multiple_of: int, padding_free: bool) -> Any:
    """Right-padding DataCollatorForSeq2Seq, or flattening (no padding) where exact.

    Left padding (IPEX-LLM's example's) leaves fully masked attention rows that gave NaN gradients in
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
