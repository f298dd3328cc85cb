"""A rank per device each worker sees: how the world size comes about, the batch rule at that
world size, and what the operator makes of rank 0's report (status.worldSize, the Valid
condition and its Event, no restart on a refusal). No torch, no cluster."""

from __future__ import annotations

from typing import Any

import pytest
from reconcile_helpers import inputs, job, pod, spec

from finetune_operator.objects import config_hash
from finetune_operator.reconcile import plan
from finetune_operator.resolve import SpecError, parse_spec, resolve, resolve_manifest
from finetune_operator.status import ranks_report
from finetune_trainer.config import World, describe_world, reconcile_world


def resolved(**fields: Any) -> Any:
    return resolve(parse_spec(spec(**fields)))


def world(workers: int, per_worker: int, total: int | None = None) -> World:
    total = workers * per_worker if total is None else total
    return World(0, 0, total, per_worker, group_world_size=workers)


@pytest.mark.parametrize(
    ("device", "cards", "per_worker", "total", "summary"),
    [
        ("xpu", 2, 4, None, "4 workers x 2 cards x 2 stacks = 16 ranks"),
        ("xpu", 2, 2, None, "4 workers x 2 cards = 8 ranks"),
        ("xpu", 2, 3, None, "4 workers x 2 cards (3 stacks in all) = 12 ranks"),
        ("cuda", 2, 2, None, "4 workers x 2 devices = 8 ranks"),
        ("cpu", 2, 2, None, "4 workers x 2 processes = 8 ranks"),
    ],
)
def test_how_the_world_size_came_about(
    device: str, cards: int, per_worker: int, total: int | None, summary: str
) -> None:
    config = resolved(device=device, workers=4, devicesPerWorker=cards)
    assert describe_world(config, world(4, per_worker, total)) == summary


def test_workers_that_saw_different_counts_are_said_so() -> None:
    config = resolved(workers=2, devicesPerWorker=2)
    text = describe_world(config, world(2, 4, total=6))
    assert text.startswith("2 workers, 6 ranks in all")


def test_accumulation_follows_the_ranks_started_and_the_global_batch_stays() -> None:
    config = resolved(workers=4, devicesPerWorker=2, training={"globalBatchSize": 128})
    assert (config.world_size, config.gradient_accumulation_steps) == (8, 8)
    ran = reconcile_world(config, world(4, 4))
    assert (ran.world_size, ran.gradient_accumulation_steps) == (16, 4)
    assert ran.global_batch_size == 128 and ran.micro_batch_size == 2


def test_uneven_workers_keep_the_true_world_size() -> None:
    config = resolved(workers=2, devicesPerWorker=2, training={"globalBatchSize": 24})
    ran = reconcile_world(config, world(2, 4, total=6))
    assert ran.world_size == 6 and ran.gradient_accumulation_steps == 2


def test_a_world_that_does_not_divide_the_batch_is_refused_naming_sizes_that_work() -> None:
    # 36 = micro 2 x accumulation 3 x 6 as the spec says; 2-stack cards make 12 ranks
    config = resolved(workers=3, devicesPerWorker=2, training={"globalBatchSize": 36})
    assert config.gradient_accumulation_steps == 3
    with pytest.raises(SpecError) as raised:
        reconcile_world(config, world(3, 4))
    assert raised.value.reason == "BatchRule"
    message = str(raised.value)
    assert "3 workers x 2 cards x 2 stacks = 12 ranks" in message
    assert "World sizes that work: 1, 2, 3, 6, 9, 18" in message


def report(config: Any, **fields: Any) -> dict[str, Any]:
    return {
        "ranks": {
            "worldSize": 4,
            "workers": 2,
            "summary": "2 workers x 1 card x 2 stacks = 4 ranks",
            "gradientAccumulationSteps": 1,
            "configHash": config_hash(config),
            **fields,
        }
    }


def condition(result: Any, type_: str) -> dict[str, Any]:
    return next(c for c in result.status["conditions"] if c["type"] == type_)


XPU = spec(device="xpu", training={"globalBatchSize": 8, "microBatchSize": 2})


def test_the_operator_shows_the_ranks_the_workers_started() -> None:
    config = resolve(parse_spec(XPU))
    running = (pod(0), pod(1))
    before = plan(inputs(XPU, None, job(), running))
    assert before.status["worldSize"] == 2
    assert condition(before, "Valid")["reason"] == "SpecValid"

    after = plan(inputs(XPU, {**before.status, **report(config)}, job(), running))

    assert after.status["worldSize"] == 4 and after.status["phase"] == "Running"
    valid = condition(after, "Valid")
    assert (valid["status"], valid["reason"]) == ("True", "DevicesCounted")
    assert "2 workers x 1 card x 2 stacks = 4 ranks" in valid["message"]
    assert [(e.type, e.reason) for e in after.events] == [("Normal", "DevicesCounted")]
    assert "ranks" not in after.status  # the trainer's field: never written by the operator


def test_a_refused_world_is_valid_false_with_an_event_and_no_restart() -> None:
    config = resolve(parse_spec(XPU))
    refusal = "world size 4 (...) does not divide the global batch: World sizes that work: 1, 2"
    status = {
        "phase": "Running",
        **report(config, reason="BatchRule", message=refusal, gradientAccumulationSteps=None),
    }
    failed = (pod(0, "Failed", False, exit_code=2), pod(1, "Failed", False, exit_code=2))

    result = plan(inputs(XPU, status, job(failed=True), failed))

    valid = condition(result, "Valid")
    assert (valid["status"], valid["reason"]) == ("False", "BatchRule")
    assert refusal in valid["message"] and "2 workers x 1 card x 2 stacks" in valid["message"]
    assert ("Warning", "BatchRule") in [(e.type, e.reason) for e in result.events]
    assert result.delete_job is None and result.status["restarts"] == 0
    assert result.status["phase"] == "Pending" and result.status["worldSize"] == 4


def test_a_report_about_another_config_is_ignored() -> None:
    old = resolve(parse_spec(XPU))
    scaled = spec(device="xpu", workers=4, training={"globalBatchSize": 8, "microBatchSize": 2})
    status = report(old, reason="BatchRule", message="refused")
    assert ranks_report(status, config_hash(old)) is not None
    assert ranks_report(status, config_hash(resolve(parse_spec(scaled)))) is None
    result = plan(inputs(scaled, status, job(world=4), (pod(0), pod(1), pod(2), pod(3))))
    assert condition(result, "Valid")["reason"] == "SpecValid"
    assert result.status["worldSize"] == 4


def test_the_trainer_reads_the_config_the_operator_mounts() -> None:
    # the hash rank 0 reports is the one the operator compares: same resolved config, both sides
    manifest = {"kind": "FinetuneJob", "spec": XPU}
    assert config_hash(resolve_manifest(manifest)) == config_hash(resolve(parse_spec(XPU)))
