"""The batch rule: accumulation = global / (micro x workers x devicesPerWorker), whole and >= 1."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finetune_operator.resolve import (
    SpecError,
    gradient_accumulation_steps,
    parse_spec,
    resolve,
    workable_world_sizes,
)

MINIMAL = {"model": {"name": "m"}, "dataset": {"name": "d"}}


def test_four_workers_of_two_devices_accumulate_eight() -> None:
    config = resolve(parse_spec({**MINIMAL, "workers": 4, "devicesPerWorker": 2}))
    assert config.world_size == 8
    assert config.gradient_accumulation_steps == 8


def test_three_workers_fail_naming_the_world_sizes_that_work() -> None:
    with pytest.raises(SpecError) as error:
        resolve(parse_spec({**MINIMAL, "workers": 3}))
    assert "World sizes that work: 1, 2, 4, 8, 16, 32, 64;" in str(error.value)
    assert error.value.reason == "BatchRule"


@given(
    global_batch=st.integers(1, 4096),
    micro=st.integers(1, 64),
    workers=st.integers(1, 256),
    devices=st.integers(1, 16),
)
def test_rule_holds_or_names_working_world_sizes(
    global_batch: int, micro: int, workers: int, devices: int
) -> None:
    world = workers * devices
    try:
        accumulation = gradient_accumulation_steps(global_batch, micro, world)
    except SpecError as error:
        assert global_batch % (micro * world) != 0
        works = workable_world_sizes(global_batch, micro)
        assert world not in works
        for size in works:
            assert gradient_accumulation_steps(global_batch, micro, size) >= 1
        if works:
            assert ", ".join(map(str, works)) in str(error)
        return
    assert accumulation >= 1
    assert accumulation * micro * world == global_batch


@given(workers=st.integers(1, 64), devices=st.integers(1, 8), new_workers=st.integers(1, 64))
def test_rescaling_keeps_the_global_batch(workers: int, devices: int, new_workers: int) -> None:
    spec = {**MINIMAL, "training": {"globalBatchSize": 4096, "microBatchSize": 1}}
    sizes = workable_world_sizes(4096, 1)
    if workers * devices not in sizes or new_workers * devices not in sizes:
        return
    config = resolve(parse_spec({**spec, "workers": workers, "devicesPerWorker": devices}))
    scaled = config.with_world(new_workers, devices)
    assert scaled.global_batch_size == config.global_batch_size
    assert scaled.gradient_accumulation_steps is not None
    assert scaled.gradient_accumulation_steps * scaled.world_size == 4096


def test_auto_micro_batch_defers_accumulation_to_the_trainer() -> None:
    config = resolve(parse_spec({**MINIMAL, "workers": 3, "training": {"microBatchSize": "auto"}}))
    assert config.micro_batch_size == "auto"
    assert config.gradient_accumulation_steps is None


def test_global_batch_not_a_multiple_of_micro() -> None:
    with pytest.raises(SpecError, match=r"not a multiple of training\.microBatchSize"):
        resolve(parse_spec({**MINIMAL, "training": {"globalBatchSize": 9}}))
