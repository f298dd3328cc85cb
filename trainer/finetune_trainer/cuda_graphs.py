"""Device graphs of the whole decoder stack, captured by hand, one per row-width bucket.

Written against the device module (`torch.cuda`, or `torch.xpu`, whose graph, generator,
stream and memory APIs have the same names): measured on CUDA; on XPU only behind
FINETUNE_XPU_EXPERIMENTAL (plan.py). Under data parallelism the model must not be wrapped in
DDP (data_parallel.OneAllReduce says why).

Why: at micro-batch 2 (about 300 tokens) a step issues thousands of small kernels and much
Python per micro-batch, and is launch- and host-bound; replaying the stack's forward and
backward as two CUDA graphs removes both. torch.compile's own CUDA graphs (mode
"reduce-overhead") crashed in the compiled backward on torch 2.11, so this captures the stack
with `torch.cuda.make_graphed_callables`, its layers eager or compiled inside (speed and
memory on an H200: benchmarks/README.md). One set for the whole stack, not a graph per layer:
a set keyed on each layer's own input would replay only layer 0, since the input's
requires-grad differs past it.

How it stays exact:
- the packing collator rounds each row up to a few widths (`pad_to_multiple_of`); pad tokens
  are a segment of their own in the block mask and carry label -100, so they change neither
  the loss nor any gradient. One graph set is captured per (shape, dtype) seen, up to
  `max_sets`; anything else (eval, no_grad outside `reference_pass`, a KV cache, more
  shapes) runs eagerly;
- the graphed layers run under the autocast the caller had at capture (re-entered inside the
  graph, without its weight cache), so the kernels are the eager path's; autocast is part of
  the set's key;
- `perf.StableGradients` must keep every `.grad` allocated: a graph's gradient outputs live
  in graph memory that the next replay overwrites, and autograd adopts rather than copies an
  incoming gradient when `.grad` is None.
All sets share one memory pool: only one micro-batch's forward and backward run at a time.

Gradient checkpointing inside the graphs (`checkpoint=True`): torch's checkpoint saves and
restores the CUDA RNG state on the host, which a capture forbids, and without it a recomputed
dropout would draw a different mask than the forward did. Here each layer draws its randomness
from a generator of its own in the forward and from a twin with the same seed in the
recomputation (`torch.Generator.graphsafe_set_state`, the mechanism inductor uses for
checkpointed RNG under its own graphs). The forward graph advances the one, the backward graph
the other, by the same amount, and the twin is set level with its forward generator before
every forward; so the recomputation draws exactly the forward's masks (exact, as eager
checkpointing with `preserve_rng_state`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

Key = tuple[Any, ...]


def _module(device_type: str) -> Any:
    """torch.cuda or torch.xpu: the graph, stream, generator and memory APIs are the same."""
    return getattr(torch, device_type)


def _graph_class(device_type: str) -> Any:
    accel = _module(device_type)
    return getattr(accel, "CUDAGraph", None) or accel.XPUGraph


@contextmanager
def _drawing_from(generator: torch.Generator) -> Iterator[None]:
    """Random ops on the device inside draw from `generator` (also while a graph is captured)."""
    default = _module(generator.device.type).default_generators[generator.device.index or 0]
    previous = default.graphsafe_get_state()
    default.graphsafe_set_state(generator)
    try:
        yield
    finally:
        default.graphsafe_set_state(previous)


class LayerRng:
    """One checkpointed layer's twin generators: the forward's, and the recomputation's."""

    def __init__(self, device: torch.device, seed: int) -> None:
        default = _module(device.type).default_generators[device.index or 0]
        self.forward = default.clone_state().manual_seed(seed)
        self.recompute = default.clone_state().manual_seed(seed)

    def level(self) -> None:
        """Before a forward: the recomputation will start where this forward starts."""
        self.recompute.set_state(self.forward.get_state())

    def contexts(self) -> tuple[Any, Any]:  # checkpoint's context_fn
        return _drawing_from(self.forward), _drawing_from(self.recompute)


class _StackCall(torch.nn.Module):
    """The decoder stack as one function of tensors (what make_graphed_callables takes)."""

    def __init__(
        self,
        layers: Sequence[torch.nn.Module],
        forwards: Sequence[Callable[..., Any]],
        autocast: torch.dtype | None,
        rng: Sequence[LayerRng] = (),
        device_type: str = "cuda",
    ) -> None:
        super().__init__()
        self.device_type = device_type
        # registered, so the layers' trainable parameters become the graphs' inputs
        self.layers = torch.nn.ModuleList(layers)
        self.forwards = list(forwards)
        self.autocast = autocast  # the caller's autocast dtype at capture, or None
        self.rng = list(rng)  # per layer when checkpointed (module docstring), else empty
        self.returned_tuple = False  # what a layer itself returns (transformers versions differ)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *mask: Any):  # type: ignore[no-untyped-def]
        # The caller's autocast, re-entered inside the graph without its weight cache
        # (make_graphed_callables refuses the cache: cached casts would outlive the capture).
        with torch.autocast(
            self.device_type,
            dtype=self.autocast or torch.bfloat16,
            enabled=self.autocast is not None,
            cache_enabled=False,
        ):
            for index, layer_forward in enumerate(self.forwards):
                kwargs: dict[str, Any] = {
                    "attention_mask": mask[0] if mask else None,
                    "position_embeddings": (cos, sin),
                }
                if self.rng:
                    out = checkpoint(
                        layer_forward,
                        hidden,
                        use_reentrant=False,
                        preserve_rng_state=False,  # the host RNG calls a capture forbids
                        context_fn=self.rng[index].contexts,
                        **kwargs,
                    )
                else:
                    out = layer_forward(hidden, **kwargs)
                self.returned_tuple = isinstance(out, tuple)
                hidden = out[0] if self.returned_tuple else out
        return hidden


class GraphedLayers:
    """Installs itself as each layer's `forward`; captures the stack per new input shape.

    Layer 0's call replays the whole stack (one forward graph, and one backward graph in the
    backward pass); each later layer, handed exactly the tensor that replay returned, passes
    it through. Any other call runs that layer eagerly (checkpointed, when `checkpoint`, and
    with torch's own RNG bookkeeping: outside a capture it is allowed).
    """

    def __init__(
        self,
        layers: Sequence[torch.nn.Module],
        max_sets: int = 8,
        compile_layers: bool = False,
        checkpoint: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.device_type = next(self.layers[0].parameters()).device.type
        self.accel = _module(self.device_type)
        self.eager = [layer.forward for layer in self.layers]
        # Inside the graphs: each layer's forward, or its torch.compile'd version (inductor
        # fuses the adapters' casts, dropout and scaling; compiled once, dynamic widths, at
        # the warm-up before the first capture).
        self.inner = (
            [torch.compile(f, dynamic=True) for f in self.eager] if compile_layers else self.eager
        )
        self.checkpoint = checkpoint
        self.rng: list[LayerRng] = []  # made at the first capture, on the layers' device
        self.max_sets = max_sets
        self.sets: dict[Key, Callable[..., torch.Tensor]] = {}
        self.returns_tuple = False
        self.pool = self.accel.graph_pool_handle()
        self.eager_calls = 0  # layer calls that ran eagerly, and that a replay served
        self.replays = 0
        self._stack_output: torch.Tensor | None = None
        self._reference = False  # inside reference_pass
        self._reference_backup: list[torch.Tensor] = []  # what reference_pass zeroes, kept
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
                    for rng in self.rng:
                        rng.level()
                    out = stack(hidden_states, cos, sin, *(() if mask is None else (mask,)))
                    self._stack_output = out
                    self.replays += 1
                    return (out,) if self.returns_tuple else out
            self.eager_calls += 1
            layer = self.layers[index]
            if self.checkpoint and layer.training and torch.is_grad_enabled():
                return checkpoint(
                    self.eager[index], hidden_states, *args, use_reentrant=False, **kwargs
                )
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
            or not (torch.is_grad_enabled() or self._reference)
            or hidden.device.type != self.device_type
            or position is None
            or cached
            or kwargs.get("use_cache")
        ):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            return None
        kind = self.device_type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
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
            with torch.enable_grad():  # a reference pass may be the first to see this shape
                stack = self._capture(key, hidden, position, mask)
        return stack

    @contextmanager
    def reference_pass(self, zeroed: Sequence[torch.Tensor]) -> Iterator[None]:
        """The stack's forward graph replayed with `zeroed` (the adapter's LoRA B matrices)
        set to zero, for DPO's reference pass (the base model: base + B A x with B = 0),
        under no_grad. Why not the adapter switched off, eagerly: the reference must round
        as the policy does, or at the first step (where B is zero and policy and reference
        are one model) the DPO margin, a difference of sums of hundreds of log-probs, is not
        zero (measured: 4e-3 to 6e-3 in the loss with compiled layers). Through the same
        graph it is zero."""
        zeroed = list(zeroed)
        if len(self._reference_backup) != len(zeroed):  # once: not an allocation per pass
            self._reference_backup = [torch.empty_like(t) for t in zeroed]
        with torch.no_grad():
            torch._foreach_copy_(self._reference_backup, zeroed)
            torch._foreach_zero_(zeroed)
        self._reference = True
        try:
            yield
        finally:
            self._reference = False
            with torch.no_grad():
                torch._foreach_copy_(zeroed, self._reference_backup)

    def _capture(
        self,
        key: Key,
        hidden: torch.Tensor,
        position: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> Callable[..., torch.Tensor] | None:
        if not any(p.requires_grad for layer in self.layers for p in layer.parameters()):
            return None  # nothing to train in the stack: no backward to capture
        if self.checkpoint and not self.rng:
            # seeds from torch's initial seed (set_seed): a rerun draws the same masks, and
            # nothing is drawn from the generators the rest of training uses
            base = torch.initial_seed()
            self.rng = [
                LayerRng(hidden.device, (base + 1 + i) * 0x9E3779B97F4A7C15 % 2**63)
                for i in range(len(self.layers))
            ]
        call = _StackCall(
            self.layers, self.inner, autocast=key[3], rng=self.rng, device_type=self.device_type
        )
        extra = () if mask is None else (mask.detach().clone(),)
        cos, sin = (t.detach().clone() for t in position)
        sample = (hidden.detach().clone().requires_grad_(hidden.requires_grad), cos, sin, *extra)
        before = self.accel.memory_allocated()
        stream = _capture_stream(self.device_type)
        _warm_up(call, sample, stream, self.rng)  # in place of make_graphed_callables' own
        if self.rng:  # checkpointed: its generators must be registered with the graphs
            self.sets[key] = _GraphedStack.capture(call, sample, self.pool, stream, self.rng)
        else:  # torch's own helper, as measured (benchmarks/README.md)
            with torch.autocast(self.device_type, enabled=False):  # (_GraphedStack says why)
                options: dict[str, Any] = {"pool": self.pool, "num_warmup_iters": 0}
                make = self.accel.make_graphed_callables
                graphed = make(call, sample, **(options | _thread_local(make)))
            self.sets[key] = cast(Callable[..., torch.Tensor], graphed)
        self.returns_tuple = call.returned_tuple
        log.info(
            "cuda graphs: captured %d layers%s for input %s (set %d of at most %d, +%.0f MiB)",
            len(self.layers),
            ", checkpointed" if self.rng else "",
            key[0],
            len(self.sets),
            self.max_sets,
            (self.accel.memory_allocated() - before) / 2**20,
        )
        return self.sets[key]


class _GraphedStack:
    """One forward and one backward CUDA graph of a `_StackCall`, replayed through autograd.

    What `torch.cuda.make_graphed_callables` does for one callable, plus what it cannot: the
    checkpointed layers' generators are registered with the graphs before capture (a graph
    advances only the generators registered with it on each replay)."""

    def __init__(self, device_type: str = "cuda") -> None:
        self.forward_graph = _graph_class(device_type)()
        self.backward_graph = _graph_class(device_type)()
        self.inputs: tuple[torch.Tensor, ...] = ()  # user inputs, then the trainable parameters
        self.user_inputs = 0
        self.output = torch.empty(0)
        self.grad_output = torch.empty(0)
        self.grad_inputs: tuple[torch.Tensor | None, ...] = ()
        # (parameter, address of its .grad) where the backward graph adds the gradients itself
        self.sinks: list[tuple[torch.Tensor, int]] = []

    @classmethod
    def capture(
        cls,
        call: _StackCall,
        sample: tuple[torch.Tensor, ...],
        pool: Any,
        stream: Any,
        rng: Sequence[LayerRng],
    ) -> _GraphedStack:
        kind = call.device_type
        accel = _module(kind)
        graphed = cls(kind)
        params = tuple(p for p in call.parameters() if p.requires_grad)
        graphed.inputs, graphed.user_inputs = (*sample, *params), len(sample)
        wrt = [t for t in graphed.inputs if t.requires_grad]
        # Where every `.grad` is allocated (perf.StableGradients), the backward graph adds the
        # parameters' gradients into them itself: no per-set copy of every gradient kept in
        # graph memory (80 MB in fp32 for the 7B model's LoRA, per set) and no AccumulateGrad
        # add per parameter per micro-batch.
        sinks = [p.grad for p in params if p.grad is not None]
        accumulate = len(sinks) == len(params)
        for layer_rng in rng:
            graphed.forward_graph.register_generator_state(layer_rng.forward)
            graphed.backward_graph.register_generator_state(layer_rng.recompute)
        options: dict[str, Any] = {"pool": pool, "stream": stream}
        options |= _thread_local(accel.graph)
        # the stack re-enters autocast inside, without the weight cache a capture refuses
        with torch.autocast(kind, enabled=False):
            for layer_rng in rng:
                layer_rng.level()
            with accel.graph(graphed.forward_graph, **options):
                output = call(*sample)
            graphed.grad_output = torch.empty_like(output)
            with accel.graph(graphed.backward_graph, **options):
                grads: tuple[torch.Tensor | None, ...] = torch.autograd.grad(
                    output, wrt, graphed.grad_output, only_inputs=True, allow_unused=True
                )
                if accumulate:
                    own = grads[len(grads) - len(params) :]  # wrt ends with the parameters
                    added = [(s, g) for s, g in zip(sinks, own, strict=True) if g is not None]
                    torch._foreach_add_([s for s, _ in added], [g for _, g in added])
                    grads = grads[: len(grads) - len(params)]  # the parameters' get None
                    del own, added  # freed inside the capture: the next set's capture reuses it
        graphed.output = output.detach()
        found = iter(grads)
        graphed.grad_inputs = tuple(
            next(found, None) if t.requires_grad else None for t in graphed.inputs
        )
        if accumulate:
            graphed.sinks = [(p, g.data_ptr()) for p, g in zip(params, sinks, strict=True)]
        return graphed

    def check_sinks(self) -> None:
        """The `.grad` the backward graph adds into must be the tensors it was captured with."""
        for param, address in self.sinks:
            grad = param.grad
            if grad is None or grad.data_ptr() != address:
                raise RuntimeError(
                    "CUDA graphs: the decoder stack's backward graph adds gradients into each "
                    "parameter's .grad as allocated at its capture, and one was replaced or "
                    "dropped; keep them in place with perf.StableGradients (its callback)"
                )

    def __call__(self, *user_inputs: torch.Tensor) -> torch.Tensor:
        params = self.inputs[self.user_inputs :]
        return _Replay.apply(self, *user_inputs, *params)  # type: ignore[no-any-return]


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, graphed: _GraphedStack, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.graphed = graphed
        for static, given in zip(graphed.inputs[: graphed.user_inputs], inputs, strict=False):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        graphed.forward_graph.replay()
        return graphed.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        graphed: _GraphedStack = ctx.graphed
        graphed.check_sinks()
        if graphed.grad_output.data_ptr() != grad.data_ptr():
            graphed.grad_output.copy_(grad)
        graphed.backward_graph.replay()
        return (None, *(g.detach() if g is not None else None for g in graphed.grad_inputs))


def _thread_local(capture: Callable[..., Any]) -> dict[str, Any]:
    """The data loader's pin-memory thread may allocate while we capture: where the capture
    call takes it, errors are checked for this thread only."""
    try:
        parameters = inspect.signature(capture).parameters
    except (TypeError, ValueError):
        return {}
    return {"capture_error_mode": "thread_local"} if "capture_error_mode" in parameters else {}


def _capture_stream(device_type: str) -> Any:
    """The device graph's default capture stream (what make_graphed_callables captures on)."""
    accel = _module(device_type)
    accel.graph(_graph_class(device_type)())  # sets graph.default_capture_stream
    return getattr(accel.graph, "default_capture_stream", None) or accel.current_stream()


def _warm_up(
    call: torch.nn.Module,
    sample: tuple[Any, ...],
    stream: Any,
    rng: Sequence[LayerRng],
) -> None:
    """Lazy CUDA set-up (cuBLAS handles, workspaces; compilation and autotuning) out of the
    captures, on the stream they use, nothing kept (torch 2.11's make_graphed_callables warms
    up on a stream of its own and keeps its last autograd graph alive: its parameters'
    AccumulateGrad nodes then belong to that stream)."""
    kind = getattr(call, "device_type", "cuda")
    accel = _module(kind)
    accel.synchronize()
    with accel.stream(stream), torch.autocast(kind, enabled=False):
        for _ in range(2):
            for layer_rng in rng:
                layer_rng.level()
            out = call(*sample)
            wrt = [t for t in (*sample, *call.parameters()) if t.requires_grad]
            torch.autograd.grad(out, wrt, torch.zeros_like(out), allow_unused=True)
            del out
    accel.synchronize()


def installed(layer: torch.nn.Module) -> GraphedLayers | None:
    """The GraphedLayers that serves `layer`, if any."""
    return getattr(layer.forward, "graphed_layers", None)
