"""`finetune-train` under bad input: one line on stderr, exit code 2, nothing written.

Each case runs the real command (`python -m finetune_trainer JOB --output DIR --nproc N`).
Checks that need no model (paths, rows, spec) answer before any process starts, so their
stderr is exactly one line; the ones that need the tokenizer (labels within cutoffLen, DPO
length limits, examples per global batch) answer from inside the ranks, and the launcher
prints the first rank's line once, after the ranks' own log lines.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from trainer_helpers import REPO, job, train

ROWS = json.loads((REPO / "trainer/finetune_trainer/examples/tiny-alpaca.json").read_text())
ERROR = "finetune-train: error: "


def assert_refused(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2, one error line (the last one on stderr), no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(ERROR)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert "ChildFailedError" not in result.stderr
    for name in names:  # the file, field or setting the message must point at
        assert name in errors[0], errors[0]
    return errors[0]


def assert_one_line(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert_refused(result, *names)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def small(tmp_path: Path, **spec: object) -> Path:
    return job(tmp_path / "job.yaml", **{"training.maxSteps": 2, **spec})


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_broken_jsonl_line_names_file_and_row(tmp_path: Path, nproc: int) -> None:
    data = jsonl(tmp_path / "rows.jsonl", ROWS[:20])
    lines = data.read_text().splitlines()
    lines[6] = lines[6][:-5]  # row 7 cut short
    data.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    result = train(small(tmp_path, **{"dataset.name": str(data)}), output, nproc, check=False)
    assert_one_line(result, str(data), "row 7", "line 7")
    assert not output.exists()


def test_null_output_names_row_and_field(tmp_path: Path) -> None:
    rows = [dict(row) for row in ROWS]
    rows[11]["output"] = None
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    output = tmp_path / "out"
    result = train(small(tmp_path, **{"dataset.name": str(data)}), output, 2, check=False)
    assert_one_line(result, str(data), "row 12", "'output'")
    assert not output.exists()


@pytest.mark.parametrize(
    "row, field",
    [({"instruction": 3, "output": "x"}, "'instruction'"), ("just text", "object")],
)
def test_row_of_wrong_type(tmp_path: Path, row: object, field: str) -> None:
    data = jsonl(tmp_path / "rows.jsonl", [*ROWS[:5], row, *ROWS[5:]])
    result = train(small(tmp_path, **{"dataset.name": str(data)}), tmp_path / "o", 1, check=False)
    assert_one_line(result, "row 6", field)


def test_dpo_row_missing_a_field(tmp_path: Path) -> None:
    rows = [{"prompt": "a b", "chosen": "c", "rejected": "d"}] * 4 + [
        {"prompt": "a", "chosen": "c"}
    ]
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    spec = {"method": "dpo", "dataset.name": str(data)}
    result = train(small(tmp_path, **spec), tmp_path / "o", 1, check=False)
    assert_one_line(result, "row 5", "'rejected'")


def test_json_file_with_one_object_instead_of_rows(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_text(json.dumps({"data": ROWS[:20]}, indent=1))
    result = train(small(tmp_path, **{"dataset.name": str(data)}), tmp_path / "o", 1, check=False)
    assert_one_line(result, str(data), "list")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset_file(tmp_path: Path, content: str) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(content)
    output = tmp_path / "out"
    result = train(small(tmp_path, **{"dataset.name": str(data)}), output, 2, check=False)
    assert_one_line(result, str(data), "no rows")
    assert not output.exists()


def test_missing_dataset_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = train(
        small(tmp_path, **{"dataset.name": str(missing)}), tmp_path / "o", 1, check=False
    )
    assert_one_line(result, str(missing), "dataset.name")


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model"])
def test_missing_local_model_is_not_a_hub_id(tmp_path: Path, name: str) -> None:
    output = tmp_path / "out"
    result = train(small(tmp_path, **{"model.name": name}), output, 2, check=False)
    assert_one_line(result, name, "model.name")
    assert not output.exists()


def test_model_folder_without_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    result = train(small(tmp_path, **{"model.name": str(folder)}), tmp_path / "o", 1, check=False)
    assert_one_line(result, "config.json")


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["config.json", "tokenizer.json"])
def test_model_folder_that_cannot_be_loaded(tmp_path: Path, broken: str) -> None:
    from finetune_trainer.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path / "model")
    (folder / broken).write_text("{not json")
    output = tmp_path / "out"
    result = train(small(tmp_path, **{"model.name": str(folder)}), output, 2, check=False)
    assert_refused(result, str(folder), "model.name")
    assert not output.exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_output_under_a_file(tmp_path: Path, nproc: int) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = train(small(tmp_path), blocker / "out", nproc, check=False)
    assert_one_line(result, str(blocker), "--output")
    assert blocker.read_text() == "not a folder"


def test_output_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("x")
    assert_one_line(train(small(tmp_path), target, 1, check=False), str(target))


def test_dpo_prompt_length_not_below_max_length(tmp_path: Path) -> None:
    spec = {
        "method": "dpo",
        "dataset.name": "bundled://tiny-dpo.jsonl",
        "dpo.maxPromptLength": 64,
        "dpo.maxLength": 64,
    }
    output = tmp_path / "out"
    result = train(small(tmp_path, **spec), output, 2, check=False)
    assert_one_line(result, "dpo.maxPromptLength", "dpo.maxLength")
    assert not output.exists()


def test_default_prompt_length_above_a_lowered_max_length(tmp_path: Path) -> None:
    spec = {"method": "dpo", "dataset.name": "bundled://tiny-dpo.jsonl", "dpo.maxLength": 512}
    result = train(small(tmp_path, **spec), tmp_path / "o", 1, check=False)
    assert_one_line(result, "dpo.maxPromptLength")


def test_resolved_json_with_dpo_lengths_reversed(tmp_path: Path) -> None:
    """--config bypasses the spec model; the trainer still checks it before starting."""
    from finetune_trainer.config import load_config

    spec = {"method": "dpo", "dataset.name": "bundled://tiny-dpo.jsonl"}
    config = load_config(small(tmp_path, **spec), output=str(tmp_path / "o"))
    assert config.dpo is not None
    bad = config.model_copy(
        update={"dpo": config.dpo.model_copy(update={"max_prompt_length": 9, "max_length": 8})}
    )
    (tmp_path / "config.json").write_text(bad.to_json())
    result = train(tmp_path / "config.json", tmp_path / "o", 1, check=False)
    assert_one_line(result, "dpo.maxPromptLength")


def test_validation_size_not_below_the_row_count(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "rows.jsonl", ROWS[:8])
    spec = {"dataset.name": str(data), "dataset.validationSize": 8}
    assert_one_line(
        train(small(tmp_path, **spec), tmp_path / "o", 1, check=False), "validationSize"
    )


def test_job_file_that_is_not_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("spec:\n  method: lora\n   model: x\n")
    assert_one_line(train(bad, tmp_path / "o", 2, check=False), str(bad), "line 3")


def test_resolved_config_that_is_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"method": "lora",\n')
    assert_one_line(train(bad, tmp_path / "o", 1, check=False), str(bad), "JSON")


def test_unknown_spec_field(tmp_path: Path) -> None:
    result = train(small(tmp_path, **{"training.learningRat": 0.1}), tmp_path / "o", 2, check=False)
    assert_one_line(result, "learningRat")


@pytest.mark.parametrize(
    "field, name", [("dataset.name", "nobody/no-such-data"), ("model.name", "nobody/no-such-model")]
)
def test_hub_name_that_cannot_be_fetched(tmp_path: Path, field: str, name: str) -> None:
    """Offline (as the tests run) a hub id that is not cached: one line, exit 1 (the network,
    not the spec, may be at fault), nothing written."""
    output = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = train(small(tmp_path, **{field: name}), output, 2, env=env, check=False)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(ERROR)]
    assert result.returncode == 1 and len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert name in errors[0] and "Traceback" not in result.stderr
    assert not output.exists()


def test_device_that_is_not_there(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    output = tmp_path / "out"
    result = train(small(tmp_path, device="cuda"), output, 2, check=False)
    assert_refused(result, "cuda")
    assert not output.exists()


def test_nproc_below_one(tmp_path: Path) -> None:
    assert_one_line(train(small(tmp_path), tmp_path / "o", 0, check=False), "--nproc")


# --- the checks that need the tokenizer: they run inside the ranks ---------------------------


@pytest.mark.slow
def test_every_label_masked_is_an_error_not_a_success(tmp_path: Path) -> None:
    """cutoffLen shorter than the prompt template with trainOnInputs false: nothing to learn."""
    spec = {"training.cutoffLen": 8, "dataset.trainOnInputs": False}
    output = tmp_path / "out"
    result = train(small(tmp_path, **spec), output, 2, check=False)
    assert_refused(result, "training.cutoffLen", "trainOnInputs")
    assert not output.exists()


def test_fewer_rows_than_one_global_batch(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "rows.jsonl", ROWS[:12])  # 12 - 8 validation = 4 < 8
    output = tmp_path / "out"
    result = train(small(tmp_path, **{"dataset.name": str(data)}), output, 1, check=False)
    assert_refused(result, "globalBatchSize", "validationSize")
    assert not output.exists()


@pytest.mark.slow
def test_every_dpo_row_dropped_by_the_length_limits(tmp_path: Path) -> None:
    """maxPromptLength one below maxLength: with the tokenizer's <s>, each prompt fills it."""
    spec = {
        "method": "dpo",
        "dataset.name": "bundled://tiny-dpo.jsonl",
        "dpo.maxPromptLength": 5,
        "dpo.maxLength": 6,
    }
    output = tmp_path / "out"
    result = train(small(tmp_path, **spec), output, 2, check=False)
    assert_refused(result, "dpo.maxLength", "dropped")
    assert not output.exists()


@pytest.mark.slow
def test_cut_rows_are_counted_once_and_training_goes_on(tmp_path: Path) -> None:
    spec = {"training.cutoffLen": 40, "dataset.trainOnInputs": False}
    output = tmp_path / "out"
    result = train(small(tmp_path, **spec), output, 2)
    counted = [line for line in result.stderr.splitlines() if "rows dropped" in line]
    assert len(counted) == 1, result.stderr[-3000:]
    assert (output / "COMPLETE").exists()
