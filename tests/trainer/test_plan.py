"""plan.py and data_parallel.py on the CPU: what each device gets, ranks balanced by tokens,
and one gradient all-reduce per optimizer step over two real gloo processes (DDP's reducer
not wrapped)."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from trainer_helpers import job

from finetune_operator.api import Method
from finetune_trainer.config import World, load_config
from finetune_trainer.data_parallel import BalancedSampler, balanced_order
from finetune_trainer.device import DeviceInfo
from finetune_trainer.plan import Capabilities, Plan, make_plan

ALL = Capabilities(liger=True, graphs=True)


@pytest.fixture
def config(tmp_path: Path) -> Any:
    # the seed's defaults where the tiny example does not set them: micro-batch 2, cutoff 256
    return load_config(job(tmp_path / "job.yaml", **{"training.cutoffLen": 256}))


def with_(config: Any, **update: Any) -> Any:
    return config.model_copy(update=update)


def test_cuda_gets_everything_at_every_world_size(config: Any) -> None:
    for world in (1, 2, 8):
        plan = make_plan(config, "cuda", world, ALL)
        assert plan.packing and plan.graphs and plan.compile_layers and plan.fused_optimizer
        assert plan.no_host_syncs and plan.balanced_ranks and plan.row_multiple == 128
        assert not plan.liger_loss  # the fused loss reads a count back every call: not in graphs
        assert plan.one_all_reduce == (world > 1)
        assert plan.stable_gradients


def test_graphs_only_where_rows_are_launch_bound(config: Any) -> None:
    assert not make_plan(with_(config, micro_batch_size=8), "cuda", 1, ALL).graphs  # 2048 wide
    auto = make_plan(with_(config, micro_batch_size="auto"), "cuda", 2, ALL)
    assert not auto.graphs and auto.row_tokens == 1024 and not auto.balanced_ranks
    assert auto.compile_layers and auto.liger_loss and auto.one_all_reduce
    assert not make_plan(with_(config, gradient_checkpointing=True), "cuda", 1, ALL).graphs
    assert not make_plan(config, "cuda", 1, Capabilities(graphs=False)).graphs
    off = make_plan(with_(config, fused_kernels=False), "cuda", 2, ALL)
    assert not (off.graphs or off.compile_layers or off.liger_loss)
    assert off.packing and off.fused_optimizer and off.one_all_reduce  # exact, not "kernels"


def test_xpu_gets_the_proven_parts_and_the_rest_behind_one_switch(config: Any) -> None:
    plain = make_plan(config, "xpu", 2, ALL)
    assert plain.packing and plain.fused_optimizer and plain.no_host_syncs
    assert plain.balanced_ranks and plain.one_all_reduce
    assert not (plain.graphs or plain.compile_layers or plain.liger_loss or plain.liger_layers)
    switched = make_plan(config, "xpu", 2, Capabilities(graphs=True, xpu_experimental=True))
    assert switched.graphs and switched.compile_layers
    assert make_plan(config, "cuda", 2, ALL).training_arguments("adamw_torch") == (
        plain.training_arguments("adamw_torch")
    )


def test_cpu_keeps_the_plain_recipe_but_reduces_once(config: Any) -> None:
    one, two = make_plan(config, "cpu", 1, ALL), make_plan(config, "cpu", 2, ALL)
    assert one == Plan(device_kind="cpu", world_size=1)
    assert two == Plan(device_kind="cpu", world_size=2, one_all_reduce=True)
    assert two.training_arguments("adamw_torch") == {"use_liger_kernel": False}


def test_dpo_plan(config: Any) -> None:
    dpo = with_(config, method=Method.DPO, micro_batch_size=4, gradient_checkpointing=True)
    graphed = make_plan(dpo, "cuda", 2, ALL)
    # eager layers inside the graphs, checkpointed there (the model's own off), lean LoRA
    assert graphed.graphs and graphed.graph_checkpointing
    assert graphed.lean_lora and graphed.liger_layers and not graphed.compile_layers
    assert graphed.one_all_reduce and graphed.balanced_ranks
    cpu = make_plan(dpo, "cpu", 2, ALL)
    assert cpu.packing and not cpu.graphs and not cpu.fused_optimizer
    padded = make_plan(with_(dpo, padding_free=False), "cuda", 1, ALL)
    assert not (padded.packing or padded.graphs or padded.no_host_syncs)


def test_deepspeed_owns_the_gradients(config: Any) -> None:
    full = with_(config, method=Method.FULL, deepspeed_zero_stage=2)
    plan = make_plan(full, "cuda", 2, ALL)
    assert not (plan.graphs or plan.one_all_reduce or plan.stable_gradients)


def test_arguments_build_on_every_device(config: Any) -> None:
    from finetune_trainer.train import training_arguments

    one = World(rank=0, local_rank=0, world_size=1, local_world_size=1)
    cpu = DeviceInfo(kind="cpu", backend="gloo", local_rank=0)
    args = training_arguments(config, cpu, one, make_plan(config, "cpu", 1, ALL))
    assert args.optim == "adamw_torch" and args.logging_nan_inf_filter
    assert args.include_num_input_tokens_seen == "no" and not args.use_liger_kernel
    cuda = make_plan(config, "cuda", 1, ALL).training_arguments("adamw_torch")
    assert cuda["optim"] == "adamw_torch_fused" and not cuda["logging_nan_inf_filter"]
    assert "optim" not in make_plan(config, "cuda", 1, ALL).training_arguments("adamw_8bit")


def _totals(order: list[int], lengths: list[int], world: int, micro: int) -> list[int]:
    """Tokens per rank under accelerate's sharding (micro-batch j to rank j mod world)."""
    totals = [0] * world
    for j in range(len(order) // micro):
        totals[j % world] += sum(lengths[i] for i in order[j * micro : (j + 1) * micro])
    return totals


def test_balanced_order_keeps_each_steps_examples_and_evens_the_ranks() -> None:
    rng = random.Random(0)
    lengths = [min(256, max(40, int(rng.lognormvariate(4.94, 0.5)))) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    for world in (2, 4, 8):
        balanced = balanced_order(order, lengths, window=128, world=world, micro=2)
        assert len(balanced) == len(order)
        for start in range(0, 1000, 128):
            assert sorted(balanced[start : start + 128]) == sorted(order[start : start + 128])
        assert balanced[896:] == order[896:]  # the partial last window keeps its order
        for start in range(0, 896, 128):
            window = balanced[start : start + 128]
            totals = _totals(window, lengths, world, 2)
            spread = (max(totals) - min(totals)) / (sum(totals) / world)
            assert spread < 0.02, (world, totals)
            before = _totals(order[start : start + 128], lengths, world, 2)
            assert max(totals) <= max(before)


def test_balanced_sampler_is_seeded_per_epoch_and_the_same_at_any_world_size() -> None:
    lengths = list(range(10, 266))
    one = BalancedSampler(lengths, window=64, world=1, micro=2, seed=42)
    two = BalancedSampler(lengths, window=64, world=2, micro=2, seed=42)
    first = list(one)
    assert first == list(one)  # the same epoch: the same order (resume skips into it)
    for start in range(0, 256, 64):
        assert sorted(first[start : start + 64]) == sorted(list(two)[start : start + 64])
    one.set_epoch(1)
    assert list(one) != first and sorted(one) == sorted(first)


# --------------------------------------------------------------------------------------------
# two gloo processes, in process: the Trainer as build_trainer makes it
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, job_file: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import TrainerCallback

    from finetune_trainer.train import build_trainer, init_distributed

    world = World.from_env()
    device = DeviceInfo(kind="cpu", backend="gloo", local_rank=rank)
    config = load_config(Path(job_file), output=str(Path(out) / "run"))
    init_distributed(device, world)
    built = build_trainer(config, device, world, [])
    trainer = built.trainer
    grads_after_reduce: list[float] = []

    class Watch(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            grads = [p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad]
            grads_after_reduce.append(float(torch.cat(grads).double().sum()))

    trainer.add_callback(Watch())
    trainer.train()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "steps": trainer.state.global_step,
                "reductions": trainer.one_all_reduce.reductions,
                "ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
                "grads": grads_after_reduce,
            }
        )
    )
    dist.destroy_process_group()


def test_one_all_reduce_per_step_over_two_gloo_processes(tmp_path: Path) -> None:
    spec = job(tmp_path / "job.yaml", **{"training.maxSteps": 4, "dataset.validationSize": 0})
    mp.spawn(_rank, args=(_free_port(), str(spec), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["steps"] == 4
        assert result["reductions"] == 4  # accumulation 2 per rank: 8 backwards, 4 reductions
        assert not result["ddp"]  # no DDP reducer: the all-reduce is ours
    assert ranks[0]["grads"] == ranks[1]["grads"]  # both ranks step on the same gradient
