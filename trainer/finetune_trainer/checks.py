"""Checks of a run's inputs before anything loads or is written: paths, data rows, lengths.

Each failure is an `InputError` whose message is one line: what is wrong, where (file, row
number counted from 1, field) and how to fix it. `finetune-train` prints it once and exits 2.
Nothing here imports torch, so the launcher runs these checks before it starts any process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune_operator.api import DatasetFormat, Method
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer.data import REQUIRED_FIELDS, DataError, data_files, too_few, training_rows
from finetune_trainer.tiny import BUNDLED_PREFIX, resolve_bundled

# alpaca's `input` may be absent, empty or null; every other field must be a string.
OPTIONAL_FIELDS = {"input"}


class InputError(DataError):
    """A bad path, spec value or data row, found before training starts."""


def looks_local(name: str) -> bool:
    """A model/dataset name meant as a path on this machine rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def check_model(config: ResolvedConfig) -> None:
    """A local model path must exist and hold a model; a hub id is left to the hub."""
    name = config.model_name
    if name.startswith(BUNDLED_PREFIX):
        return
    path = Path(name).expanduser()
    if looks_local(name) or path.exists():
        if not path.is_dir():
            raise InputError(
                f"model.name {name}: no such folder on this machine (a local path, not a hub "
                "id): fix the path, or give a hub id such as meta-llama/Llama-2-7b-hf"
            )
        if not (path / "config.json").is_file():
            raise InputError(
                f"model.name {name}: the folder holds no config.json, so it is not a saved "
                "model: point it at the folder save_pretrained wrote"
            )


def check_output(config: ResolvedConfig) -> None:
    """The output folder can be created and written (checked without creating it)."""
    output = Path(config.output_path)
    if output.exists() and not output.is_dir():
        raise InputError(
            f"output {output} is a file, not a folder: choose another --output (or output.path)"
        )
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(
            f"output {output}: {existing} is a file, so no folder can be made under it: choose "
            "another --output (or output.path)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"output {output}: {existing} is not writable by this user: choose another "
            "--output (or output.path), or fix the folder's permissions"
        )


def check_dpo_lengths(config: ResolvedConfig) -> None:
    """maxPromptLength must leave room for a response within maxLength."""
    if config.method is not Method.DPO or config.dpo is None:
        return
    if config.dpo.max_prompt_length >= config.dpo.max_length:
        raise InputError(
            f"dpo.maxPromptLength {config.dpo.max_prompt_length} is not below dpo.maxLength "
            f"{config.dpo.max_length}: every prompt could fill the sequence and leave no "
            "response token to train on; lower maxPromptLength or raise maxLength"
        )


def _rows_of(path: Path) -> Iterator[tuple[int, int, Any]]:
    """(row number from 1, line number from 1, row) of a .json or .jsonl file."""
    text = path.read_text(encoding="utf-8", errors="strict")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("{") and "\n" in stripped.rstrip():
        try:  # one object over several lines: not rows (JSON lines fall through below)
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise InputError(
                f"dataset {path} holds one JSON object, not rows: give a list of row objects "
                "([{...}, {...}]) or one row object per line"
            )
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(
                f"dataset {path}: line {error.lineno} column {error.colno} is not valid JSON "
                f"({error.msg}): fix that line (a .json file holds one list of rows)"
            ) from None
        for number, row in enumerate(rows, 1):
            yield number, 0, row
        return
    number = 0
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        number += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(
                f"dataset {path}: row {number} (line {line_number}) is not valid JSON "
                f"({error.msg} at column {error.colno}): fix or remove that line (a .jsonl "
                "file holds one JSON object per line)"
            ) from None
        yield number, line_number, row


def check_row(row: Any, data_format: DatasetFormat, where: str) -> None:
    """One row: an object whose required fields are strings (alpaca's input may be absent)."""
    if not isinstance(row, dict):
        raise InputError(
            f"{where} is a JSON {type(row).__name__}, not an object: each row is an object "
            f"with fields {', '.join(REQUIRED_FIELDS[data_format])}"
        )
    for field in REQUIRED_FIELDS[data_format]:
        if field not in row:
            raise InputError(
                f"{where} has no field {field!r} (format {data_format.value} needs "
                f"{', '.join(REQUIRED_FIELDS[data_format])}): add it or remove the row"
            )
    fields = (*REQUIRED_FIELDS[data_format], *OPTIONAL_FIELDS & set(row))
    for field in fields:
        value = row[field]
        if field in OPTIONAL_FIELDS and value is None:
            continue
        if not isinstance(value, str):
            shown = "null" if value is None else f"a {type(value).__name__}"
            raise InputError(
                f"{where}: field {field!r} is {shown}, not text: give it a string or remove the row"
            )
    if not row[REQUIRED_FIELDS[data_format][-1]].strip():
        field = REQUIRED_FIELDS[data_format][-1]
        raise InputError(f"{where}: field {field!r} is empty: give it text or remove the row")


def check_local_data(config: ResolvedConfig) -> int | None:
    """Every row of a local data set (parsed here, so an error names its row); the row count.

    None for a hub data set: its rows are checked once loaded (`data.check_rows`).
    """
    name = resolve_bundled(config.dataset_name)
    files = data_files(name)
    if files is None:
        return None
    count = 0
    for file in files:
        path = Path(file)
        try:
            for number, line, row in _rows_of(path):
                where = f"dataset {path}: row {number}" + (f" (line {line})" if line else "")
                check_row(row, config.dataset_format, where)
                count += 1
        except UnicodeDecodeError as error:
            raise InputError(
                f"dataset {path}: byte {error.start} is not UTF-8 text: save the file as UTF-8"
            ) from None
    if count == 0:
        where = files[0] if len(files) == 1 else f"{name} ({len(files)} files)"
        raise InputError(
            f"dataset {where} holds no rows: give a file with at least one row per line "
            "(.jsonl) or a list of rows (.json)"
        )
    return count


def preflight(config: ResolvedConfig) -> None:
    """Everything that can be checked before the model loads and before the output is made."""
    check_dpo_lengths(config)
    check_output(config)
    check_model(config)
    count = check_local_data(config)
    if count is not None:  # a local data set: enough rows for one global batch?
        train_rows = training_rows(count, config.validation_size)
        too_few(config, train_rows, 0, "rows" if config.method is not Method.DPO else "pairs")
