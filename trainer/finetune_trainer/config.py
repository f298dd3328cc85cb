"""The run's configuration: the operator's resolved config, or a FinetuneJob YAML resolved here.

Defaults and the batch rule live in `finetune_operator.api` / `finetune_operator.resolve`
(one place, read by the operator and the trainer alike); this module only loads, reconciles
the world size with what torchrun actually started, and checks the batch rule.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from finetune_operator.resolve import (
    ResolvedConfig,
    SpecError,
    load_manifest,
    resolve_manifest,
)

log = logging.getLogger(__name__)


# Set by the pod launcher (finetune_trainer.launch) in the ranks it starts: how many devices
# its worker saw, so that rank 0 can say how the world size came about.
DEVICES_SEEN_ENV = "FINETUNE_DEVICES_SEEN"


@dataclass(frozen=True)
class World:
    """Where this process sits, from torchrun's environment (1 process when run directly)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    # torchrun's GROUP_WORLD_SIZE: the workers (pods) in the rendezvous; 0 where not given
    group_world_size: int = 0
    devices_seen: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        if self.group_world_size:
            return self.group_world_size
        return max(1, self.world_size // self.local_world_size)

    @property
    def uniform(self) -> bool:
        """Every worker started as many ranks as this one (as far as this process can tell)."""
        return self.nodes * self.local_world_size == self.world_size

    @classmethod
    def from_env(cls) -> World:
        def env(name: str, default: int) -> int:
            return int(os.environ.get(name, default))

        world = env("WORLD_SIZE", 1)
        seen = os.environ.get(DEVICES_SEEN_ENV)
        return cls(
            rank=env("RANK", 0),
            local_rank=env("LOCAL_RANK", 0),
            world_size=world,
            local_world_size=env("LOCAL_WORLD_SIZE", world),
            group_world_size=env("GROUP_WORLD_SIZE", 0),
            devices_seen=int(seen) if seen else None,
        )


def _count(number: int, what: str) -> str:
    return f"{number} {what}" + ("" if number == 1 else "es" if what.endswith("s") else "s")


def describe_world(config: ResolvedConfig, world: World) -> str:
    """How the world size came about, e.g. "4 workers x 2 cards x 2 stacks = 16 ranks".

    `config` is the spec's (devicesPerWorker = the devices each pod requested: cards on xpu).
    """
    workers, ranks = _count(world.nodes, "worker"), _count(world.world_size, "rank")
    local, cards = world.local_world_size, config.devices_per_worker
    if not world.uniform:
        return (
            f"{workers}, {ranks} in all: the workers do not all see as many devices "
            f"(worker of rank 0: {_count(local, 'rank')} on {_count(cards, 'requested device')})"
        )
    if config.device.value == "cpu":
        return f"{workers} x {_count(local, 'process')} = {ranks}"
    if config.device.value == "xpu":
        if local == cards:
            return f"{workers} x {_count(cards, 'card')} = {ranks}"
        if local % cards == 0:
            return f"{workers} x {_count(cards, 'card')} x {local // cards} stacks = {ranks}"
        return f"{workers} x {_count(cards, 'card')} ({local} stacks in all) = {ranks}"
    return f"{workers} x {_count(local, 'device')} = {ranks}"


def load_config(path: str | Path, output: str | None = None) -> ResolvedConfig:
    """A resolved config (JSON, as the operator mounts it) or a FinetuneJob manifest (YAML).

    `output` replaces outputPath (handy for local runs: the spec demands an absolute path
    meant for a pod's volume).
    """
    text = Path(path).read_text()
    stripped = text.lstrip()
    try:
        if stripped.startswith("{"):
            config = ResolvedConfig.model_validate(json.loads(text))
        else:
            config = resolve_manifest(load_manifest(text))
    except json.JSONDecodeError as error:
        raise SpecError(
            f"{path}: line {error.lineno} column {error.colno} is not valid JSON ({error.msg})"
        ) from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        raise SpecError(f"{path}: not a resolved config: {problems}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise SpecError(f"{path}:{where}: {problem}: fix the YAML (indentation?)") from None
    if output is not None:
        config = config.model_copy(update={"output_path": str(Path(output).resolve())})
    return config


def reconcile_world(
    config: ResolvedConfig, world: World, origin: str | None = None
) -> ResolvedConfig:
    """Train at the world size torchrun started, keeping the global batch.

    The operator writes the config for workers x devicesPerWorker processes. Where that is not
    what runs (a pod with 2-stack Max cards starts a rank per stack; a local `torchrun
    --nproc-per-node 2` of a one-worker spec; a restart at another size) the global batch is
    what must stay fixed, since it is what makes a step mean the same samples and the same
    gradient; so accumulation is recomputed with the same batch rule as the operator's
    (`with_world`), and a world size at which the rule cannot hold is refused with the
    operator's message naming sizes that work. `origin` says how the world size came about.
    """
    if config.world_size == world.world_size:
        return config
    origin = origin or describe_world(config, world)
    log.info(
        "world size %d (%s); the config was resolved for %d (%d x %d): gradient accumulation "
        "recomputed to keep globalBatchSize %d",
        world.world_size,
        origin,
        config.world_size,
        config.workers,
        config.devices_per_worker,
        config.global_batch_size,
    )
    per_worker = world.local_world_size if world.uniform else config.devices_per_worker
    return config.with_world(world.nodes, per_worker, world.world_size, origin)


def check_batch_rule(config: ResolvedConfig, world: World) -> None:
    """Refuse to start unless micro x accumulation x world == global batch."""
    micro, accumulation = config.micro_batch_size, config.gradient_accumulation_steps
    if micro == "auto" or accumulation is None:
        raise SpecError("microBatchSize auto must be resolved before the batch rule is checked")
    product = micro * accumulation * world.world_size
    if product != config.global_batch_size or config.world_size != world.world_size:
        raise SpecError(
            f"batch rule broken: microBatchSize {micro} x gradientAccumulationSteps "
            f"{accumulation} x world size {world.world_size} = {product}, but globalBatchSize "
            f"is {config.global_batch_size} (config world size {config.world_size})",
            reason="BatchRule",
        )


def format_table(config: ResolvedConfig) -> str:
    """Every effective hyperparameter, one per line, as rank 0 logs it at start."""
    flat: dict[str, object] = {}
    for key, value in config.model_dump(mode="json", by_alias=True).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    width = max(len(k) for k in flat)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in sorted(flat.items()))
