"""cuda_graphs.GraphedLayers keeps the math: on a CUDA device, a LoRA model whose decoder layers
replay as hand-captured graphs gives the eager model's loss and accumulated gradients, over two
row widths (two graph sets), repeated widths (replays), and after an optimizer step (the graphs
must see the new LoRA weights). Run on the lent GPU (`pytest -m gpu`); skipped without CUDA.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import examples, rel, tiny_llama

from finetune_trainer import cuda_graphs, perf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
]


def lora(model: Any, dropout: float = 0.0) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B: the LoRA branch contributes from the first step
            torch.nn.init.normal_(p, std=0.02)
    return peft_model.train()


def accumulate(model: Any, batches: list[dict[str, torch.Tensor]], bf16: bool) -> list[float]:
    losses = []
    for batch in batches:
        on_device = {k: v.cuda() for k, v in batch.items()}
        n_items = int((batch["labels"][:, 1:] != -100).sum())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**on_device, num_items_in_batch=torch.tensor(n_items)).loss
        loss.backward()
        losses.append(float(loss.detach()))
        # as Trainer does: nothing of this micro-batch's autograd graph outlives it. Kept
        # alive into the next forward, its parameters' AccumulateGrad nodes (made on the
        # default stream by the replay) are reused by a new width's backward capture, whose
        # stream sync then fails (seen with the checkpointed capture on an H200).
        del loss
    return losses


def test_eval_and_no_grad_stay_eager() -> None:
    model = lora(tiny_llama().cuda())
    perf.optimize_model(
        model, perf.PerfOptions(compile_layers=False, liger_loss=False, cuda_graphs=True)
    )
    batch = {
        k: v.cuda() for k, v in perf.PackingCollator(pad_to_multiple_of=32)(examples(2)).items()
    }
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch)
    layers = perf.decoder_layers(model)
    owner = cuda_graphs.installed(layers[0])
    assert owner is not None and owner.sets == {}
    assert owner.eager_calls == 2 * len(layers) and owner.replays == 0


@pytest.mark.parametrize(
    ("bf16", "graphed_autocast", "checkpointed"),
    [
        (False, False, False),
        (False, False, True),
        # captures because the graphs re-enter autocast inside them (without that it fails
        # to capture on torch 2.11)
        (True, True, False),
        (True, False, False),
        (True, True, True),
    ],
    ids=[
        "fp32",
        "fp32-checkpointed",
        "bf16-autocast",
        "bf16-base-no-autocast",
        "bf16-checkpointed",
    ],
)
def test_graphed_layers_same_loss_and_accumulated_grads(
    bf16: bool, graphed_autocast: bool, checkpointed: bool
) -> None:
    # bf16: bf16 base weights and fp32 LoRA as in training; the eager reference runs under
    # autocast (as Trainer's bf16 does), the graphed model with or without it
    base = (tiny_llama().to(torch.bfloat16) if bf16 else tiny_llama()).cuda()
    eager = lora(copy.deepcopy(base))
    graphed = lora(base)
    layers = perf.decoder_layers(graphed)
    perf.optimize_model(
        graphed,
        perf.PerfOptions(
            compile_layers=False,
            liger_loss=False,
            cuda_graphs=True,
            graph_checkpointing=checkpointed,
        ),
    )
    stable = perf.StableGradients(graphed)
    collate = perf.PackingCollator(pad_to_multiple_of=32)
    batches = [collate(examples(2, seed=s)) for s in (11, 12, 13, 14)]
    widths = {b["input_ids"].shape[1] for b in batches}
    assert len(widths) >= 2, "the test needs two row widths"
    tol = 2e-2 if bf16 else 1e-4
    trainable = [p for p in eager.parameters() if p.requires_grad]
    graph_params = [p for p in graphed.parameters() if p.requires_grad]
    opt_e = torch.optim.SGD(trainable, lr=0.5)
    opt_g = torch.optim.SGD(graph_params, lr=0.5)
    for step in range(2):  # the second step runs on LoRA weights the first one changed
        opt_e.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        stable.attach()
        loss_e = accumulate(eager, batches, bf16)
        loss_g = accumulate(graphed, batches, graphed_autocast)
        for a, b in zip(loss_g, loss_e, strict=True):
            assert abs(a - b) / abs(b) < tol, (step, loss_g, loss_e)
        worst = max(
            rel(g.grad, e.grad)  # type: ignore[arg-type]
            for g, e in zip(graph_params, trainable, strict=True)
        )
        assert worst < (5e-2 if bf16 else 1e-3), (step, worst)
        opt_e.step()
        opt_g.step()
    # every layer call of every micro-batch replayed a graph: one set per width, no eager
    # fallback (a counter of model forwards would miss that only layer 0 was replayed)
    owner = cuda_graphs.installed(layers[0])
    assert owner is not None
    assert len(owner.sets) == len(widths) and owner.eager_calls == 0
    assert owner.replays == 2 * len(batches) * len(layers)


def test_checkpointed_graphs_recompute_the_forwards_dropout_masks() -> None:
    """With LoRA dropout, a recomputation that drew other masks than the forward would give
    the gradient of another function. Reference: the eager model, each layer drawing from a
    generator set to where the graphed layer's forward generator stood before the replay (so
    the same masks), no checkpointing: loss and gradients must agree."""
    base = tiny_llama().cuda()
    eager = lora(copy.deepcopy(base), dropout=0.2)
    graphed = lora(base, dropout=0.2)
    perf.optimize_model(
        graphed,
        perf.PerfOptions(
            compile_layers=False, liger_loss=False, cuda_graphs=True, graph_checkpointing=True
        ),
    )
    stable = perf.StableGradients(graphed)
    owner = cuda_graphs.installed(perf.decoder_layers(graphed)[0])
    assert owner is not None
    eager_layers = perf.decoder_layers(eager)
    drawn = [torch.Generator("cuda") for _ in eager_layers]
    for layer, generator in zip(eager_layers, drawn, strict=True):
        layer.forward = _drawing(layer.forward, generator)
    batch = perf.PackingCollator(pad_to_multiple_of=32)(examples(2, seed=5))
    accumulate(graphed, [batch], bf16=False)  # captures, and replays once
    trainable = [p for p in eager.parameters() if p.requires_grad]
    graph_params = [p for p in graphed.parameters() if p.requires_grad]
    for _ in range(2):  # replays only: the generators move on, the masks change
        for generator, rng in zip(drawn, owner.rng, strict=True):
            generator.set_state(rng.forward.get_state())
        graphed.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        stable.attach()
        (loss_g,) = accumulate(graphed, [batch], bf16=False)
        (loss_e,) = accumulate(eager, [batch], bf16=False)
        assert abs(loss_g - loss_e) / abs(loss_e) < 1e-5, (loss_g, loss_e)
        worst = max(
            rel(g.grad, e.grad)  # type: ignore[arg-type]
            for g, e in zip(graph_params, trainable, strict=True)
        )
        assert worst < 1e-3, worst
    assert owner.eager_calls == 0 and len(owner.sets) == 1


def _drawing(forward: Any, generator: torch.Generator) -> Any:
    def drawing(*args: Any, **kwargs: Any) -> Any:
        with cuda_graphs._drawing_from(generator):
            return forward(*args, **kwargs)

    return drawing


def test_in_graph_gradients_refuse_a_dropped_grad() -> None:
    """Checkpointed graphs captured with every .grad allocated add the gradients into those
    tensors inside the backward graph. A .grad dropped without StableGradients putting it back
    must fail loudly, not lose the micro-batch's gradient."""
    model = lora(tiny_llama().cuda())
    perf.optimize_model(
        model,
        perf.PerfOptions(
            compile_layers=False, liger_loss=False, cuda_graphs=True, graph_checkpointing=True
        ),
    )
    stable = perf.StableGradients(model)
    stable.attach()
    batch = perf.PackingCollator(pad_to_multiple_of=32)(examples(2, seed=5))
    accumulate(model, [batch, batch], bf16=False)  # captures, then replays
    owner = cuda_graphs.installed(perf.decoder_layers(model)[0])
    assert owner is not None and len(owner.sets) == 1
    (stack,) = owner.sets.values()
    assert stack.sinks  # type: ignore[attr-defined]
    twice = [p.grad.clone() for p in stable.params]  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    stable.attach()
    accumulate(model, [batch], bf16=False)
    for p, both in zip(stable.params, twice, strict=True):  # added in place, from zero
        assert rel(2 * p.grad, both) < 1e-5  # type: ignore[operator]
    model.zero_grad(set_to_none=True)  # and no attach
    with pytest.raises(RuntimeError, match="StableGradients"):
        accumulate(model, [batch], bf16=False)


@pytest.mark.parametrize("lean", [False, True], ids=["peft-fp32", "lean-lora-bf16"])
def test_reference_pass_replays_the_policy_graph_as_the_adapter_off(lean: bool) -> None:
    """DPO's reference under graphs: the policy's forward graph with LoRA B zeroed, under
    no_grad, gives the adapter-off model's logits, and puts B back. With the lean LoRA forward
    (bf16 base under autocast, as DPO trains) B = 0 adds an exact zero in the GEMM."""
    base = tiny_llama().to(torch.bfloat16) if lean else tiny_llama()
    model = lora(base.cuda())  # B non-zero: the adapter changes the logits
    perf.optimize_model(
        model,
        perf.PerfOptions(compile_layers=False, liger_loss=False, cuda_graphs=True, lean_lora=lean),
    )
    owner = cuda_graphs.installed(perf.decoder_layers(model)[0])
    assert owner is not None
    batch = {
        k: v.cuda() for k, v in perf.PackingCollator(pad_to_multiple_of=32)(examples(2)).items()
    }
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=lean):
        with model.disable_adapter():
            expected = model(**batch).logits.float()
        policy = model(**batch).logits.float()  # no_grad outside a reference pass: eager
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    before = [p.detach().clone() for p in lora_b]
    with (
        torch.no_grad(),
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=lean),
        owner.reference_pass(lora_b),
    ):
        got = model(**batch).logits.float()
    assert rel(policy, expected) > 1e-3  # the adapter matters here
    assert rel(got, expected) < (1e-2 if lean else 1e-5)
    assert all(torch.equal(p, b) for p, b in zip(lora_b, before, strict=True))
    assert len(owner.sets) == 1 and owner.replays == len(perf.decoder_layers(model))


def test_finetune_train_dpo_on_one_gpu_replays_graphs_checkpointed(tmp_path: Path) -> None:
    """The product path end to end: `finetune-train` with method dpo on one CUDA GPU builds
    packed DPO under CUDA graphs of the stack, checkpointed inside, with the reference through
    the policy's graph: step 1 is log 2 (policy = reference), the loss goes down."""
    import math

    from trainer_helpers import job, losses, train

    spec = {
        "method": "dpo",
        "device": "cuda",
        "devicesPerWorker": 1,
        "dataset.name": "bundled://tiny-dpo.jsonl",
        "training.learningRate": 0.005,
        "training.maxSteps": 12,
        "training.bf16": True,
        "training.gradientCheckpointing": True,
        "lora.dropout": 0.05,
    }
    output = tmp_path / "out"
    result = train(job(tmp_path / "job.yaml", **spec), output, nproc=1)
    log = result.stdout + result.stderr
    assert "CUDA graphs over" in log and "checkpointed inside" in log, log[-3000:]
    assert "lean LoRA forward on" in log, log[-3000:]
    steps = losses(output)
    # policy = reference at step 1, summed in a fixed order (packed_dpo): the margin is zero
    assert abs(steps[1] - math.log(2)) < 1e-6, steps
    assert steps[max(steps)] < steps[1], steps
