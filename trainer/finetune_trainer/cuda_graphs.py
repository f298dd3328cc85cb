"""CUDA graphs of the whole decoder stack, captured by hand, one per row-width bucket.

Why: at micro-batch 2 (about 300 tokens) a step issues thousands of small kernels and much
Python per micro-batch, and is launch- and host-bound; replaying the stack's forward and
backward as two CUDA graphs removes both. torch.compile's own CUDA graphs (mode
"reduce-overhead") crashed in the compiled backward on torch 2.11, so this captures the stack
with `torch.cuda.make_graphed_callables`, its layers eager or compiled inside. Measured on an
H200 (benchmarks/README.md, fourth session): 5.8x the plain recipe for LoRA, 6.7x for QLoRA,
with less memory. (Session 3 measured a graph per layer as "no faster": only layer 0 was
replayed, the set being keyed on each layer's own input, whose requires-grad differs past
layer 0, and the replay counter counting model forwards.)

How it stays exact:
- the packing collator rounds each row up to a few widths (`pad_to_multiple_of`); pad tokens
  are a segment of their own in the block mask and carry label -100, so they change neither
  the loss nor any gradient. One graph set is captured per (shape, dtype) seen, up to
  `max_sets`; anything else (eval, no_grad such as DPO's reference pass, a KV cache, more
  shapes) runs eagerly;
- the graphed layers run under the autocast the caller had at capture (re-entered inside the
  graph, without its weight cache), so the kernels are the eager path's; autocast is part of
  the set's key;
- `perf.StableGradients` must keep every `.grad` allocated: a graph's gradient outputs live
  in graph memory that the next replay overwrites, and autograd adopts rather than copies an
  incoming gradient when `.grad` is None.
All sets share one memory pool: only one micro-batch's forward and backward run at a time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

log = logging.getLogger(__name__)

Key = tuple[Any, ...]


class _StackCall(torch.nn.Module):
    """The decoder stack as one function of tensors (what make_graphed_callables takes)."""

    def __init__(
        self,
        layers: Sequence[torch.nn.Module],
        forwards: Sequence[Callable[..., Any]],
        autocast: torch.dtype | None,
    ) -> None:
        super().__init__()
        # registered, so the layers' trainable parameters become the graphs' inputs
        self.layers = torch.nn.ModuleList(layers)
        self.forwards = list(forwards)
        self.autocast = autocast  # the caller's autocast dtype at capture, or None
        self.returned_tuple = False  # what a layer itself returns (transformers versions differ)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *mask: Any):  # type: ignore[no-untyped-def]
        # The caller's autocast, re-entered inside the graph without its weight cache
        # (make_graphed_callables refuses the cache: cached casts would outlive the capture).
        with torch.autocast(
            "cuda",
            dtype=self.autocast or torch.bfloat16,
            enabled=self.autocast is not None,
            cache_enabled=False,
        ):
            for layer_forward in self.forwards:
                out = layer_forward(
                    hidden, attention_mask=mask[0] if mask else None, position_embeddings=(cos, sin)
                )
                self.returned_tuple = isinstance(out, tuple)
                hidden = out[0] if self.returned_tuple else out
        return hidden


class GraphedLayers:
    """Installs itself as each layer's `forward`; captures the stack per new input shape.

    Layer 0's call replays the whole stack (one forward graph, and one backward graph in the
    backward pass); each later layer, handed exactly the tensor that replay returned, passes
    it through. Any other call runs that layer eagerly.
    """

    def __init__(
        self, layers: Sequence[torch.nn.Module], max_sets: int = 8, compile_layers: bool = False
    ) -> None:
        self.layers = list(layers)
        self.eager = [layer.forward for layer in self.layers]
        # Inside the graphs: each layer's forward, or its torch.compile'd version (inductor
        # fuses the adapters' casts, dropout and scaling; compiled once, dynamic widths, at
        # the warm-up before the first capture).
        self.inner = (
            [torch.compile(f, dynamic=True) for f in self.eager] if compile_layers else self.eager
        )
        self.max_sets = max_sets
        self.sets: dict[Key, Callable[..., torch.Tensor]] = {}
        self.returns_tuple = False
        self.pool = torch.cuda.graph_pool_handle()
        self.eager_calls = 0  # layer calls that ran eagerly, and that a replay served
        self.replays = 0
        self._stack_output: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            layer.forward = self._dispatcher(index)

    def _dispatcher(self, index: int) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if index > 0 and hidden_states is self._stack_output:
                self.replays += 1  # the stack already ran whole: pass its output through
                return (hidden_states,) if self.returns_tuple else hidden_states
            if index == 0:
                self._stack_output = None
                stack = self._stack(hidden_states, args, kwargs)
                if stack is not None:
                    cos, sin = kwargs["position_embeddings"]
                    mask = kwargs.get("attention_mask")
                    out = stack(hidden_states, cos, sin, *(() if mask is None else (mask,)))
                    self._stack_output = out
                    self.replays += 1
                    return (out,) if self.returns_tuple else out
            self.eager_calls += 1
            return self.eager[index](hidden_states, *args, **kwargs)

        forward.graphed_layers = self  # type: ignore[attr-defined]
        return forward

    def _stack(
        self, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[..., torch.Tensor] | None:
        position = kwargs.get("position_embeddings")
        cached = any(
            kwargs.get(k) is not None for k in ("cache", "past_key_values", "past_key_value")
        )
        if (
            args
            or not all(layer.training for layer in self.layers)
            or not torch.is_grad_enabled()
            or not hidden.is_cuda
            or position is None
            or cached
            or kwargs.get("use_cache")
        ):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            return None
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key: Key = (
            tuple(hidden.shape),
            hidden.dtype,
            hidden.requires_grad,
            autocast,
            None if mask is None else (tuple(mask.shape), mask.dtype),
            tuple(position[0].shape),
            position[0].dtype,
        )
        stack = self.sets.get(key)
        if stack is None and len(self.sets) < self.max_sets:
            stack = self._capture(key, hidden, position, mask)
        return stack

    def _capture(
        self,
        key: Key,
        hidden: torch.Tensor,
        position: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> Callable[..., torch.Tensor] | None:
        if not any(p.requires_grad for layer in self.layers for p in layer.parameters()):
            return None  # nothing to train in the stack: no backward to capture
        call = _StackCall(self.layers, self.inner, autocast=key[3])
        extra = () if mask is None else (mask.detach().clone(),)
        cos, sin = (t.detach().clone() for t in position)
        sample = (hidden.detach().clone().requires_grad_(hidden.requires_grad), cos, sin, *extra)
        self._warm_up(call, sample)  # in place of make_graphed_callables' own
        self.returns_tuple = call.returned_tuple
        options: dict[str, Any] = {"pool": self.pool, "num_warmup_iters": 0}
        if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
            # the data loader's pin-memory thread may allocate while we capture
            options["capture_error_mode"] = "thread_local"
        before = torch.cuda.memory_allocated()
        # make_graphed_callables refuses autocast's weight cache (the stack re-enters autocast)
        with torch.autocast("cuda", enabled=False):
            graphed = torch.cuda.make_graphed_callables(call, sample, **options)
        self.sets[key] = cast(Callable[..., torch.Tensor], graphed)
        log.info(
            "cuda graphs: captured %d layers for input %s (set %d of at most %d, +%.0f MiB)",
            len(self.layers),
            key[0],
            len(self.sets),
            self.max_sets,
            (torch.cuda.memory_allocated() - before) / 2**20,
        )
        return self.sets[key]

    @staticmethod
    def _warm_up(call: torch.nn.Module, sample: tuple[Any, ...]) -> None:
        """Lazy CUDA set-up (cuBLAS handles, workspaces; compilation and autotuning) out of
        the captures, done here rather than by make_graphed_callables: torch 2.11's own
        warm-up runs on a stream of its own and keeps its last graph alive (its parameters'
        AccumulateGrad nodes then belong to that stream). Here: on the stream the captures
        use, nothing kept."""
        torch.cuda.graph(torch.cuda.CUDAGraph())  # sets graph.default_capture_stream
        stream = torch.cuda.graph.default_capture_stream or torch.cuda.current_stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(stream), torch.autocast("cuda", enabled=False):
            for _ in range(2):
                out = call(*sample)
                wrt = [t for t in (*sample, *call.parameters()) if t.requires_grad]
                torch.autograd.grad(out, wrt, torch.zeros_like(out), allow_unused=True)
                del out
        torch.cuda.synchronize()


def installed(layer: torch.nn.Module) -> GraphedLayers | None:
    """The GraphedLayers that serves `layer`, if any."""
    return getattr(layer.forward, "graphed_layers", None)
