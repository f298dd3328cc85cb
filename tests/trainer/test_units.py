"""Fast checks of the trainer's pieces, in process (no torchrun)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import EXAMPLE, job

from finetune_operator.api import DatasetFormat
from finetune_operator.resolve import SpecError
from finetune_trainer.cli import main
from finetune_trainer.config import (
    World,
    check_batch_rule,
    format_table,
    load_config,
    reconcile_world,
)
from finetune_trainer.data import (
    IGNORE_INDEX,
    DataError,
    alpaca_tokenizer,
    build_collator,
    check_fields,
    load_rows,
    truncate_prompt,
)
from finetune_trainer.device import OOM_ADVICE, DeviceError, DeviceInfo, is_oom, select_device
from finetune_trainer.model import load_base_model, load_tokenizer
from finetune_trainer.progress import StatusPatcher
from finetune_trainer.save import (
    CHECKPOINT_MARKER,
    latest_complete_checkpoint,
    remove_incomplete_checkpoints,
)
from finetune_trainer.tiny import resolve_bundled

CPU = DeviceInfo(kind="cpu", backend="gloo", local_rank=0)


def world(n: int) -> World:
    return World(rank=0, local_rank=0, world_size=n, local_world_size=n)


@pytest.fixture(scope="module")
def config() -> Any:
    return load_config(EXAMPLE, output="/tmp/unused")


@pytest.fixture(scope="module")
def tokenizer(config: Any) -> Any:
    return load_tokenizer(config)


def test_example_resolves_with_shared_defaults(config: Any) -> None:
    assert (config.world_size, config.gradient_accumulation_steps) == (2, 2)
    assert config.output_path == "/tmp/unused"
    assert config.max_grad_norm == 0.3 and config.lr_scheduler == "cosine"  # the seed's
    assert "globalBatchSize" in format_table(config)


def test_world_from_torchrun_keeps_global_batch(config: Any) -> None:
    one = reconcile_world(config, world(1))
    assert (one.world_size, one.gradient_accumulation_steps, one.global_batch_size) == (1, 4, 8)
    check_batch_rule(one, world(1))
    with pytest.raises(SpecError, match="World sizes that work: 1, 2, 4"):
        reconcile_world(config, world(3))
    with pytest.raises(SpecError, match="batch rule broken"):
        check_batch_rule(config, world(1))


def test_pad_token_as_seed(tokenizer: Any) -> None:
    assert tokenizer.pad_token_id == 0 == tokenizer.unk_token_id
    assert tokenizer.padding_side == "right"


def test_alpaca_prompt_masking_and_cutoff(tokenizer: Any) -> None:
    row = {"instruction": "Repeat the words.", "input": "cat dog", "output": "cat dog."}
    masked = alpaca_tokenizer(tokenizer, 256, train_on_inputs=False)(row)
    assert masked["input_ids"][-1] == tokenizer.eos_token_id
    learned = [
        t
        for t, label in zip(masked["input_ids"], masked["labels"], strict=False)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned[:-1]) == "cat dog."
    full = alpaca_tokenizer(tokenizer, 256, train_on_inputs=True)(row)
    assert full["labels"] == full["input_ids"]
    assert len(alpaca_tokenizer(tokenizer, 16, True)(row)["input_ids"]) == 16


def test_missing_field_names_field_and_file(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "x", "input": ""}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl: field\(s\) output missing"):
        check_fields(load_rows(str(data)), DatasetFormat.ALPACA, str(data))


def test_dpo_prompt_keeps_its_end(tokenizer: Any) -> None:
    row = {"prompt": "What is the opposite of hot?", "chosen": "x", "rejected": "y"}
    assert truncate_prompt(tokenizer, 3)(row)["prompt"] == "of hot?"


def test_padding_free_equals_right_padding_and_grads_finite(config: Any, tokenizer: Any) -> None:
    """Packed rows (position ids, no padding) give the padded batch's loss and gradient."""
    model = load_base_model(config, CPU)
    fn = alpaca_tokenizer(tokenizer, 256, True)
    rows = json.loads(Path(resolve_bundled("bundled://tiny-alpaca.json")).read_text())[:4]
    features = [fn(r) for r in rows]
    results = []
    for padding_free in (False, True):
        batch = build_collator(tokenizer, 8, padding_free)([dict(f) for f in features])
        model.zero_grad()
        tokens = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
        loss = model(**batch, num_items_in_batch=tokens).loss
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(grad).all()
        results.append((loss.item(), grad.clone()))
    (padded_loss, padded_grad), (packed_loss, packed_grad) = results
    assert math.isclose(padded_loss, packed_loss, rel_tol=1e-5)
    assert torch.allclose(padded_grad, packed_grad, rtol=1e-4, atol=1e-6)


def test_qlora_base_is_4bit_on_cpu(tmp_path: Path) -> None:
    qlora = load_config(job(tmp_path / "j.yaml", method="qlora"), output=str(tmp_path))
    model = load_base_model(qlora, CPU)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds


def test_latest_complete_checkpoint_skips_partial(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step}" / CHECKPOINT_MARKER).write_text("{}")
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert remove_incomplete_checkpoints(tmp_path) == [tmp_path / "checkpoint-30"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]


def test_missing_device_says_what_was_found() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match=r"device cuda requested but none is visible; found: cpu"):
        select_device("cuda", 0, 1)
    assert select_device("cpu", 0, 1).backend == "gloo"


def test_oom_is_recognised_and_advice_names_knobs() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_oom(ValueError("nope"))
    for knob in ("microBatchSize", "cutoffLen", "gradientCheckpointing"):
        assert knob in OOM_ADVICE


def test_status_patch_failures_never_raise_and_newest_wins() -> None:
    sent: list[dict[str, Any]] = []

    def flaky(body: dict[str, Any]) -> None:
        sent.append(body)
        raise ConnectionError("API server down")

    patcher = StatusPatcher("j", "ns", interval=0.05, send=flaky)
    for step in range(1, 50):
        patcher.report({"progress": {"step": step, "summary": f"{step}/50"}})
    time.sleep(0.3)
    patcher.close()
    assert sent, "nothing was sent"
    assert len(sent) < 49  # rate limited: reports coalesce
    assert sent[-1]["status"]["progress"]["step"] == 49


def test_cli_bad_spec_exits_2_with_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = job(tmp_path / "bad.yaml", **{"training.globalBatchSize": 7})
    assert main([str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "globalBatchSize 7" in capsys.readouterr().err


def test_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    from finetune_trainer.train import run

    (tmp_path / "COMPLETE").write_text(json.dumps({"step": 20, "adapter": "x"}))
    result = run(load_config(EXAMPLE, output=str(tmp_path)), world(1))
    assert result.summary["step"] == 20 and result.resumed_from is None


def test_deepspeed_missing_is_a_clear_error(tmp_path: Path) -> None:
    from finetune_trainer.device import importable
    from finetune_trainer.plan import Capabilities, make_plan
    from finetune_trainer.train import TrainingError, training_arguments

    if importable("deepspeed"):
        pytest.skip("deepspeed is installed")
    full = load_config(
        job(tmp_path / "j.yaml", method="full", **{"training.deepspeedZeroStage": 2})
    )
    with pytest.raises(TrainingError, match=r"needs DeepSpeed.*finetune-operator\[deepspeed\]"):
        training_arguments(full, CPU, world(2), make_plan(full, "cpu", 2, Capabilities()))


def test_resolved_json_as_the_operator_mounts_it(tmp_path: Path, config: Any) -> None:
    mounted = tmp_path / "config.json"
    mounted.write_text(config.to_json())
    assert load_config(mounted) == config


def test_auto_micro_batch_keeps_global_batch(config: Any) -> None:
    from finetune_trainer.train import rule_micro_batch

    auto = config.model_copy(
        update={"micro_batch_size": "auto", "gradient_accumulation_steps": None}
    )
    chosen = rule_micro_batch(auto, world(2), CPU)
    check_batch_rule(chosen, world(2))
    assert chosen.global_batch_size == 8
