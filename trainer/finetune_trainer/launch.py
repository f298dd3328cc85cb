"""The worker pod's entry point: count the devices the pod sees, then run torchrun with one rank
per device.

    python -m finetune_trainer.launch --nnodes=4 --node-rank=$(NODE_RANK) \\
        --master-addr=NAME-worker-0.NAME-workers --master-port=29500 \\
        --config /etc/finetune/config.json

The device plugin counts cards (`gpu.intel.com/i915: 2` is two cards), but with
ZE_FLAT_DEVICE_HIERARCHY=FLAT every stack of a Data Center GPU Max card is a device of its
own, so a pod given two 2-stack cards sees four. This launcher asks the device seam
(`device.device_count`) how many devices the pod sees and execs torchrun with
`--nproc-per-node` = that count (`device.ranks_per_worker`: xpu counts stacks, cuda and cpu
start devicesPerWorker as before). `--nnodes` stays the number of workers; torchrun's
rendezvous gives each worker's ranks their global numbers from what every worker started, so
the world size is the sum over workers, whatever each one saw.

In the ranks, `start_world` (called by `finetune-train` before training) recomputes gradient
accumulation for the world size torchrun started, keeping the global batch; it refuses a world
size that does not divide the global batch (one line, exit 2), and rank 0 reports the world
size and how it came about, or the refusal, to the FinetuneJob's `status.ranks`, from which the
operator writes `status.worldSize`, the Valid condition and an Event.

torchrun replaces this process (exec): signals reach it as they would without the launcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from finetune_operator.resolve import ResolvedConfig, SpecError

log = logging.getLogger(__name__)

JOB_NAME_ENV = "FINETUNE_JOB_NAME"
JOB_NAMESPACE_ENV = "FINETUNE_JOB_NAMESPACE"
# How long rank 0 waits for its status report to reach the API server before going on.
REPORT_TIMEOUT_SECONDS = 20.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.launch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nnodes", type=int, required=True, help="workers (pods)")
    parser.add_argument("--node-rank", type=int, required=True, help="this pod's index")
    parser.add_argument("--master-addr", required=True, help="rank 0's worker")
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--config", required=True, help="resolved config JSON")
    return parser


def torchrun_argv(args: argparse.Namespace, nproc: int) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, the same Python) for this worker."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={args.nnodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.master_addr}",
        f"--master-port={args.master_port}",
        "-m",
        "finetune_trainer",
        "--config",
        args.config,
    ]


def main(argv: list[str] | None = None) -> int:
    from finetune_trainer.cli import BAD_INPUT, _fail, _one_line
    from finetune_trainer.config import DEVICES_SEEN_ENV, load_config

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("FINETUNE_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s worker{args.node_rank} %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
    except (SpecError, OSError) as error:
        return _fail(_one_line(error), BAD_INPUT)
    from finetune_trainer.device import DeviceError, device_count, ranks_per_worker

    kind = config.device.value
    try:
        visible = device_count(kind)
        nproc = ranks_per_worker(kind, config.devices_per_worker, visible)
    except DeviceError as error:
        return _fail(_one_line(error), BAD_INPUT)
    log.info(
        "worker %d of %d: %d %s device(s) visible, %d requested: starting %d rank(s)",
        args.node_rank,
        args.nnodes,
        visible if kind != "cpu" else 0,
        kind,
        config.devices_per_worker,
        nproc,
    )
    os.environ[DEVICES_SEEN_ENV] = str(visible if kind != "cpu" else nproc)
    command = torchrun_argv(args, nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


def start_world(config: ResolvedConfig, world: Any = None) -> ResolvedConfig:
    """In each rank, before anything loads: the config at the world size torchrun started.

    Accumulation is recomputed so the global batch stays as set; a world size that does not
    divide it raises SpecError (BatchRule) naming the sizes that work. Rank 0 of a FinetuneJob
    reports the outcome to its status (`status.ranks`), for the operator to show.
    """
    from finetune_trainer.config import World, reconcile_world

    world = world or World.from_env()
    report = _world_report(config, world)
    summary = report["summary"]
    try:
        reconciled = reconcile_world(config, world, summary)
    except SpecError as error:
        refused = {"reason": error.reason, "message": str(error), "gradientAccumulationSteps": None}
        _report(world, {**report, **refused})
        raise
    # None deletes a refusal an earlier start may have left (status.ranks is merge-patched).
    accumulation = reconciled.gradient_accumulation_steps
    _report(
        world,
        {**report, "gradientAccumulationSteps": accumulation, "reason": None, "message": None},
    )
    if world.is_main:
        log.info("world size %d: %s", world.world_size, summary)
    return reconciled


def report_refusal(config: ResolvedConfig, reason: str, message: str) -> None:
    """Rank 0 of a FinetuneJob: tell the operator why this group cannot train (`status.ranks`
    with a reason), so it says so in a condition and an Event instead of restarting."""
    from finetune_trainer.config import World

    world = World.from_env()
    refused = {"reason": reason, "message": message, "gradientAccumulationSteps": None}
    _report(world, {**_world_report(config, world), **refused})


def _world_report(config: ResolvedConfig, world: Any) -> dict[str, Any]:
    """What every `status.ranks` report says: the world started, how it came about, and the
    config it is about (the operator ignores a report about another spec)."""
    from finetune_operator.objects import config_hash
    from finetune_trainer.config import describe_world

    return {
        "worldSize": world.world_size,
        "workers": world.nodes,
        "summary": describe_world(config, world),
        "configHash": config_hash(config),
    }


def _report(world: Any, ranks: dict[str, Any]) -> None:
    """Rank 0 of a FinetuneJob: merge-patch status.ranks, and wait until it is sent (the
    refusal is followed by the process's exit)."""
    job = os.environ.get(JOB_NAME_ENV)
    if not (world.is_main and job):
        return
    from finetune_trainer.progress import StatusPatcher

    patcher = StatusPatcher(job, os.environ.get(JOB_NAMESPACE_ENV, "default"), interval=0.0)
    patcher.report({"ranks": ranks})
    patcher.close()
    # With interval 0 the patcher's thread ends right after its one send (or at once, when
    # close() sent it): joined, the report has left before training starts or the rank exits.
    patcher._thread.join(timeout=REPORT_TIMEOUT_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
