"""What the progress lines say about tokens is what was trained on.

`tokens` (cumulative non-padding input tokens, all ranks) and `tokensPerSecond` are on every
training line for every method; over one epoch on one process the count equals the
non-padding tokens of the training split, counted independently here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import job, progress, train

pytestmark = pytest.mark.slow


def _training_lines(output: Path) -> list[dict[str, float]]:
    return [r for r in progress(output) if "loss" in r]


def test_alpaca_tokens_are_the_training_splits_tokens(tmp_path: Path) -> None:
    from finetune_trainer.config import load_config
    from finetune_trainer.data import build_datasets
    from finetune_trainer.model import load_tokenizer

    # 96 bundled rows, 8 held out: 88 train rows = 11 steps of 8, one epoch
    spec = job(tmp_path / "job.yaml", **{"training.maxSteps": 11, "training.saveSteps": 100})
    output = tmp_path / "out"
    train(spec, output, nproc=1)

    config = load_config(spec, output=str(output))
    train_split, _ = build_datasets(config, load_tokenizer(config))
    expected = sum(len(ids) for ids in train_split["input_ids"])

    lines = _training_lines(output)
    assert len(lines) == 11
    assert all(r.get("tokensPerSecond", 0) > 0 for r in lines)
    counts = [r["tokens"] for r in lines]
    assert counts == sorted(counts)
    assert counts[-1] == expected


def test_dpo_lines_carry_tokens_within_what_a_step_can_hold(tmp_path: Path) -> None:
    spec = job(
        tmp_path / "job.yaml",
        **{
            "method": "dpo",
            "dataset.name": "bundled://tiny-dpo.jsonl",
            "training.maxSteps": 3,
            "training.globalBatchSize": 8,
            "training.microBatchSize": 2,
            "training.learningRate": 1e-4,
            "dpo.maxLength": 64,
            "dpo.maxPromptLength": 32,
        },
    )
    output = tmp_path / "out"
    train(spec, output, nproc=1)
    lines = _training_lines(output)
    assert len(lines) == 3
    assert all(r.get("tokensPerSecond", 0) > 0 for r in lines)
    previous = 0
    for record in lines:
        step_tokens = record["tokens"] - previous
        previous = record["tokens"]
        # 8 pairs a step, a chosen and a rejected sequence each, 1..maxLength tokens each
        # (one micro-batch of prefetch may shift a step's count by up to one micro-batch)
        assert 2 <= step_tokens <= (8 + 2) * 2 * 64
