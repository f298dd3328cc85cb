"""Every default (IPEX-LLM's QLoRA alpaca example, alpaca_qlora_finetuning.py; DPO: its
dpo_finetuning.py), as the resolved config shows them."""

from __future__ import annotations

import re

import pytest

from finetune_operator.api import DatasetFormat, Device, Method
from finetune_operator.resolve import SpecError, check_name, parse_spec, resolve

MINIMAL = {
    "model": {"name": "meta-llama/Llama-2-7b-hf"},
    "dataset": {"name": "yahma/alpaca-cleaned"},
}


def resolved(**spec: object):  # type: ignore[no-untyped-def]
    return resolve(parse_spec({**MINIMAL, **spec}))


def test_qlora_defaults() -> None:
    config = resolved()
    assert config.method is Method.QLORA
    assert config.device is Device.XPU
    assert config.device_resource == "gpu.intel.com/i915"
    assert config.distributed_backend == "xccl"
    assert config.workers == 1 and config.devices_per_worker == 1 and config.world_size == 1
    assert config.micro_batch_size == 2
    assert config.global_batch_size == 128
    assert config.gradient_accumulation_steps == 64
    assert config.learning_rate == 3e-5
    assert config.max_grad_norm == 0.3
    assert config.bf16 is True
    assert config.lr_scheduler == "cosine"
    assert config.optimizer == "adamw_torch"
    assert config.epochs == 3
    assert config.max_steps is None
    assert config.cutoff_len == 256
    assert config.pad_to_multiple_of == 8
    assert config.eval_steps == 100
    assert config.save_steps == 100
    assert config.save_total_limit == 100
    assert config.seed == 42
    assert config.validation_size == 2000
    assert config.train_on_inputs is True
    assert config.dataset_format is DatasetFormat.ALPACA
    assert config.lora is not None
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 16, 0.05)
    assert config.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert config.quantization is not None
    assert (config.quantization.bits, config.quantization.type) == (4, "nf4")
    assert config.quantization.double_quant is True
    assert config.dpo is None
    assert config.output_path == "/output"


def test_dpo_defaults() -> None:
    config = resolved(method="dpo")
    assert config.dataset_format is DatasetFormat.DPO
    assert config.micro_batch_size == 4
    assert config.global_batch_size == 16
    assert config.gradient_accumulation_steps == 4
    assert config.learning_rate == 5e-5
    assert config.max_steps == 200
    assert config.dpo is not None
    assert (config.dpo.beta, config.dpo.max_prompt_length, config.dpo.max_length) == (
        0.1,
        1024,
        1536,
    )
    assert config.cutoff_len == 1536
    assert config.quantization is None
    assert config.lora is not None


def test_every_default_is_overridable() -> None:
    config = resolved(
        method="lora",
        training={
            "globalBatchSize": 64,
            "microBatchSize": 4,
            "learningRate": 1e-4,
            "epochs": 1,
            "maxSteps": 10,
            "maxGradNorm": 1.0,
            "lrScheduler": "linear",
            "optimizer": "adamw_torch_fused",
            "bf16": False,
            "cutoffLen": 512,
            "padToMultipleOf": 16,
            "evalSteps": 5,
            "saveSteps": 5,
            "saveTotalLimit": 2,
            "seed": 7,
        },
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj"]},
        dataset={"name": "d", "validationSize": 0.1, "trainOnInputs": False},
    )
    assert (
        config.global_batch_size,
        config.micro_batch_size,
        config.gradient_accumulation_steps,
    ) == (64, 4, 16)
    assert (config.learning_rate, config.epochs, config.max_steps) == (1e-4, 1, 10)
    assert (config.max_grad_norm, config.lr_scheduler, config.optimizer) == (
        1.0,
        "linear",
        "adamw_torch_fused",
    )
    assert (config.bf16, config.cutoff_len, config.pad_to_multiple_of) == (False, 512, 16)
    assert (config.eval_steps, config.save_steps, config.save_total_limit, config.seed) == (
        5,
        5,
        2,
        7,
    )
    assert (
        config.lora is not None and config.lora.r == 16 and config.lora.target_modules == ["q_proj"]
    )
    assert config.quantization is None
    assert config.validation_size == 0.1 and config.train_on_inputs is False


@pytest.mark.parametrize(
    ("device", "resource", "backend"),
    [
        ("xpu", "gpu.intel.com/i915", "xccl"),
        ("cuda", "nvidia.com/gpu", "nccl"),
        ("cpu", None, "gloo"),
    ],
)
def test_device_picks_resource_and_backend(device: str, resource: str | None, backend: str) -> None:
    config = resolved(device=device)
    assert config.device_resource == resource
    assert config.distributed_backend == backend


def test_operator_setting_overrides_device_resource_and_spec_wins() -> None:
    spec = parse_spec(MINIMAL)
    assert resolve(spec, {"xpu": "gpu.intel.com/xe"}).device_resource == "gpu.intel.com/xe"
    spec = parse_spec({**MINIMAL, "deviceResource": "example.com/gpu"})
    assert resolve(spec, {"xpu": "gpu.intel.com/xe"}).device_resource == "example.com/gpu"


def test_full_method_has_no_adapter() -> None:
    config = resolved(method="full")
    assert config.lora is None and config.quantization is None


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (
            {"method": "lora", "quantization": {"bits": 4}},
            "quantization is not used by method lora",
        ),
        (
            {"method": "dpo", "dataset": {"name": "d", "format": "alpaca"}},
            "method dpo takes dataset.format dpo",
        ),
        ({"dataset": {"name": "d", "format": "dpo"}}, "does not fit method qlora"),
        ({"training": {"deepspeedZeroStage": 2}}, "deepspeedZeroStage applies to method full"),
        ({"dataset": {"name": "d", "validationSize": 2.5}}, "neither a row count"),
        ({"workers": 0}, "spec.workers"),
        ({"trainingg": {}}, "spec.trainingg"),
        ({"training": {"microBatchSize": "big"}}, "spec.training.microBatchSize"),
        ({"training": {"lrScheduler": "cosinus"}}, "spec.training.lrScheduler"),
        ({"training": {"microBatchSize": 0}}, "spec.training.microBatchSize"),
        ({"resources": {"limits": 1}}, "spec.resources.limits"),
        ({"device": "cpu", "deviceResource": "gpu.intel.com/i915"}, "remove deviceResource"),
        ({"nodeSelector": {"pool": "bad value!"}}, "spec.nodeSelector[pool]: 'bad value!'"),
    ],
)
def test_bad_specs_say_what_to_change(spec: dict[str, object], says: str) -> None:
    with pytest.raises(SpecError, match=re.escape(says)):
        resolve(parse_spec({**MINIMAL, **spec}))


def test_missing_model_is_named() -> None:
    with pytest.raises(SpecError, match=r"spec\.model"):
        parse_spec({"dataset": {"name": "d"}})


@pytest.mark.parametrize("name", ["a.b", "1job", "Upper", "x" * 41])
def test_names_that_cannot_name_the_worker_service(name: str) -> None:
    with pytest.raises(SpecError, match=r"metadata\.name"):
        check_name(name)
    check_name("llama2-alpaca")
