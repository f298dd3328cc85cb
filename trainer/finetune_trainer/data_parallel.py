"""Data parallelism as the fast path needs it: ranks balanced by tokens, one all-reduce a step.

Two pieces, both exact (the global batch and its token-mean gradient are what one device
computes):

* `BalancedSampler`: the examples of each optimizer step (a window of `globalBatchSize`
  indices of a seeded permutation, the same at every world size) are dealt to the ranks by
  token count, longest first to the rank with the fewest tokens so far, and laid out so that
  accelerate's sharding (micro-batch j goes to rank j mod world) hands each rank its share.
  Within a rank, long and short examples share a micro-batch, so packed rows have similar
  widths (few graph shapes). The step's set of examples is the window, whatever the world
  size, so the gradient is the same; only which rank computes what changes.
* `OneAllReduce`: gradient accumulation stays local to each rank and, after the backward of
  an optimizer step's last micro-batch, every gradient is all-reduced as one flat buffer
  (`perf.StableGradients` keeps them in one), and the model is not wrapped in DDP at all
  (`OneAllReduce` says why). The sum is divided by the world size, as DDP's mean is (the
  Trainer's loss already counts the label tokens of every rank, `average_tokens_across_devices`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from finetune_trainer.perf import StableGradients


def balanced_order(
    order: Sequence[int], lengths: Sequence[int], window: int, world: int, micro: int
) -> list[int]:
    """`order` rearranged within each full window so rank r's micro-batches (every world-th
    micro-batch, from r) carry about 1/world of the window's tokens.

    A window that does not split into whole micro-batches per rank (the epoch's last, partial
    one) keeps its order.
    """
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = list(order[start : start + window])
        per_rank, rest = divmod(len(chunk), world)
        if rest or per_rank % micro or len(chunk) < window:
            out.extend(chunk)
            continue
        # longest first, each to the rank with the fewest tokens that still has room
        shares: list[list[int]] = [[] for _ in range(world)]
        heap = [(0, r) for r in range(world)]
        for index in sorted(chunk, key=lambda i: (-lengths[i], i)):
            tokens, r = heapq.heappop(heap)
            shares[r].append(index)
            if len(shares[r]) < per_rank:
                heapq.heappush(heap, (tokens + lengths[index], r))
        # within a rank: the longest with the shortest, so rows come out alike
        for share in shares:
            share.sort(key=lambda i: (-lengths[i], i))
            paired: list[int] = []
            while share:
                paired.append(share.pop(0))
                if share:
                    paired.append(share.pop())
            share[:] = paired
        micro_batches = per_rank // micro
        for j in range(micro_batches * world):
            rank, k = j % world, j // world
            out.extend(shares[rank][k * micro : (k + 1) * micro])
    return out


class BalancedSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch (seed + epoch), rearranged by `balanced_order`.

    Every rank builds the same order (accelerate then shards it), and so does every world
    size, so a run's steps see the same examples however many devices it has."""

    def __init__(
        self, lengths: Sequence[int], window: int, world: int, micro: int, seed: int
    ) -> None:
        self.lengths = list(lengths)
        self.window, self.world, self.micro, self.seed = window, world, micro, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        return iter(balanced_order(order, self.lengths, self.window, self.world, self.micro))


def dataset_lengths(dataset: Any, count: Callable[[dict[str, Any]], int]) -> list[int]:
    """Tokens per example, by the same count the host token counter uses."""
    return [count(row) for row in dataset]


class OneAllReduce:
    """After the last micro-batch's backward of each optimizer step: one all-reduce (sum) of
    the flat gradient buffer(s), divided by the world size.

    `install(trainer)` wraps the accelerator's backward, and has the Trainer's model prepared
    without DDP (accelerate's `evaluation_mode`: placement and autocast, no wrapper). Not DDP
    with its reducer idled: DDP's reducer holds every parameter's AccumulateGrad node from
    its construction, on the default stream, and a graph capture whose backward reaches them
    then fails ("operation would make the legacy stream depend on a capturing blocking
    stream"). The parameters start equal on every rank from the seed; they are broadcast
    from rank 0 once anyway, as DDP does. `reductions` counts the all-reduces."""

    def __init__(self, gradients: StableGradients) -> None:
        self.gradients = gradients
        self.reductions = 0

    def reduce(self) -> None:
        world = dist.get_world_size()
        for buffer in self.gradients.buffers.values():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
        self.reductions += 1

    def install(self, trainer: Any) -> None:
        accelerator = trainer.accelerator
        backward = accelerator.backward
        prepare_model = accelerator.prepare_model
        owner = self

        def backward_then_reduce(loss: torch.Tensor, **kwargs: Any) -> None:
            backward(loss, **kwargs)
            if accelerator.sync_gradients:
                owner.reduce()

        def prepare_without_ddp(
            model: torch.nn.Module,
            device_placement: bool | None = None,
            evaluation_mode: bool = False,
        ) -> Any:
            prepared = prepare_model(model, device_placement=device_placement, evaluation_mode=True)
            if not evaluation_mode:
                with torch.no_grad():
                    for parameter in owner.gradients.params:
                        dist.broadcast(parameter.data, src=0)
            return prepared

        accelerator.backward = backward_then_reduce
        accelerator.prepare_model = prepare_without_ddp


__all__ = ["BalancedSampler", "OneAllReduce", "balanced_order", "dataset_lengths"]
