"""Spec -> resolved config: every effective hyperparameter, the world size and the batch rule.

The resolved config is what the operator writes into the job's ConfigMap and
`status.resolved`, and what the trainer trains with. It is pure data: no torch, no cluster.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from finetune_operator.api import (
    DEFAULT_DEVICE_RESOURCE,
    DEFAULT_VALIDATION_SIZE,
    DPO_DEFAULTS,
    KIND,
    MAX_NAME_LENGTH,
    SFT_DEFAULTS,
    DatasetFormat,
    Device,
    FinetuneJobSpec,
    Method,
    QuantizationSpec,
)

# Kubernetes label values; a nodeSelector value outside it would make the API server reject
# the worker Job, so it is a spec error here.
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
# The FinetuneJob's name prefixes the Service (a DNS-1035 label) and the pods' subdomain.
JOB_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

DISTRIBUTED_BACKEND = {Device.XPU: "xccl", Device.CUDA: "nccl", Device.CPU: "gloo"}


class SpecError(ValueError):
    """A spec that cannot run. The message says what to change."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason


class _Resolved(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ResolvedLora(_Resolved):
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]


class ResolvedQuantization(_Resolved):
    bits: int
    type: str
    double_quant: bool


class ResolvedDpo(_Resolved):
    beta: float
    max_prompt_length: int
    max_length: int


class ResolvedConfig(_Resolved):
    """Everything the trainer needs, after defaults and the batch rule."""

    method: Method
    model_name: str
    model_revision: str | None
    dataset_name: str
    dataset_format: DatasetFormat
    validation_size: int | float
    train_on_inputs: bool
    device: Device
    device_resource: str | None
    distributed_backend: str
    workers: int
    devices_per_worker: int
    world_size: int
    global_batch_size: int
    micro_batch_size: int | Literal["auto"]
    # None only while micro_batch_size is "auto": the trainer derives it once it has measured.
    gradient_accumulation_steps: int | None
    learning_rate: float
    epochs: float
    max_steps: int | None
    max_grad_norm: float
    lr_scheduler: str
    warmup_ratio: float
    optimizer: str
    weight_decay: float
    bf16: bool
    cutoff_len: int
    pad_to_multiple_of: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    logging_steps: int
    seed: int
    gradient_checkpointing: bool
    padding_free: bool
    fused_kernels: bool
    deepspeed_zero_stage: int | None
    lora: ResolvedLora | None
    quantization: ResolvedQuantization | None
    dpo: ResolvedDpo | None
    output_path: str
    merge_adapter: bool

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True)

    def with_world(
        self,
        workers: int,
        devices_per_worker: int,
        world_size: int | None = None,
        origin: str = "workers x devicesPerWorker",
    ) -> ResolvedConfig:
        """The same run at another world size: accumulation recomputed, global batch kept.

        `world_size` defaults to workers x devices_per_worker; it differs where the workers
        started different numbers of ranks (each counts the devices it sees). `origin` says
        how the world size came about, for the batch rule's message.
        """
        world = workers * devices_per_worker if world_size is None else world_size
        accumulation = None
        if self.micro_batch_size != "auto":
            accumulation = gradient_accumulation_steps(
                self.global_batch_size, self.micro_batch_size, world, origin
            )
        return self.model_copy(
            update={
                "workers": workers,
                "devices_per_worker": devices_per_worker,
                "world_size": world,
                "gradient_accumulation_steps": accumulation,
            }
        )


def workable_world_sizes(global_batch_size: int, micro_batch_size: int) -> list[int]:
    """World sizes at which the global batch splits into whole accumulation steps."""
    if global_batch_size % micro_batch_size:
        return []
    per_step = global_batch_size // micro_batch_size
    return [n for n in range(1, per_step + 1) if per_step % n == 0]


def gradient_accumulation_steps(
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    origin: str = "workers x devicesPerWorker",
) -> int:
    """The batch rule: globalBatchSize / (microBatchSize x worldSize), a whole number >= 1.

    `origin` says where the world size comes from in the message (the spec's product, or the
    ranks the workers started once each counted its devices)."""
    per_pass = micro_batch_size * world_size
    if global_batch_size % per_pass == 0:
        return global_batch_size // per_pass
    works = workable_world_sizes(global_batch_size, micro_batch_size)
    if not works:
        raise SpecError(
            f"training.globalBatchSize {global_batch_size} is not a multiple of "
            f"training.microBatchSize {micro_batch_size}: make the global batch a multiple of "
            "the micro-batch.",
            reason="BatchRule",
        )
    raise SpecError(
        f"world size {world_size} ({origin}) does not divide the global "
        f"batch: globalBatchSize {global_batch_size} / (microBatchSize {micro_batch_size} x "
        f"world size {world_size}) is not a whole number >= 1. World sizes that work: "
        f"{', '.join(map(str, works))}; or change training.globalBatchSize or "
        "training.microBatchSize.",
        reason="BatchRule",
    )


def resolve(
    spec: FinetuneJobSpec, device_resources: Mapping[str, str] | None = None
) -> ResolvedConfig:
    """Apply the method's defaults and the batch rule. Raises SpecError on a spec that cannot run.

    `device_resources` overrides the default extended resource per device kind (an operator
    setting, e.g. {"xpu": "gpu.intel.com/xe"}); `spec.deviceResource` wins over both.
    """
    is_dpo = spec.method is Method.DPO
    defaults = DPO_DEFAULTS if is_dpo else SFT_DEFAULTS
    training = spec.training

    dataset_format = spec.dataset.format or (DatasetFormat.DPO if is_dpo else DatasetFormat.ALPACA)
    if (dataset_format is DatasetFormat.DPO) != is_dpo:
        raise SpecError(
            f"dataset.format {dataset_format.value} does not fit method {spec.method.value}: "
            "method dpo takes dataset.format dpo (prompt/chosen/rejected), the other methods "
            "take alpaca (instruction/input/output).",
        )
    if spec.quantization is not None and spec.method in (Method.LORA, Method.FULL):
        raise SpecError(
            f"quantization is not used by method {spec.method.value}: remove it, or use "
            "method qlora for 4-bit training.",
        )
    if training.deepspeed_zero_stage is not None and spec.method is not Method.FULL:
        raise SpecError(
            "training.deepspeedZeroStage applies to method full only: remove it for "
            f"method {spec.method.value}.",
        )
    if spec.device is Device.CPU and spec.device_resource is not None:
        raise SpecError("device cpu requests no accelerator: remove deviceResource.")
    for key, value in (spec.node_selector or {}).items():
        if not LABEL_VALUE.fullmatch(value):
            raise SpecError(
                f"spec.nodeSelector[{key}]: {value!r} is not a label value (at most 63 "
                "characters: letters, digits, '-', '_' and '.', starting and ending with a "
                "letter or digit).",
            )
    validation_size = (
        DEFAULT_VALIDATION_SIZE
        if spec.dataset.validation_size is None
        else spec.dataset.validation_size
    )
    if validation_size >= 1:
        if validation_size != int(validation_size):
            raise SpecError(
                f"dataset.validationSize {validation_size} is neither a row count (whole "
                "number) nor a fraction (< 1).",
            )
        validation_size = int(validation_size)

    global_batch = training.global_batch_size or defaults.global_batch_size
    micro_batch = training.micro_batch_size or defaults.micro_batch_size
    world_size = spec.workers * spec.devices_per_worker
    accumulation = (
        None
        if micro_batch == "auto"
        else gradient_accumulation_steps(global_batch, micro_batch, world_size)
    )

    quantization = spec.quantization
    if spec.method is Method.QLORA and quantization is None:
        quantization = QuantizationSpec()
    device_resource = spec.device_resource
    if device_resource is None and spec.device is not Device.CPU:
        overrides = device_resources or {}
        device_resource = overrides.get(spec.device.value, DEFAULT_DEVICE_RESOURCE[spec.device])

    return ResolvedConfig(
        method=spec.method,
        model_name=spec.model.name,
        model_revision=spec.model.revision,
        dataset_name=spec.dataset.name,
        dataset_format=dataset_format,
        validation_size=validation_size,
        train_on_inputs=spec.dataset.train_on_inputs,
        device=spec.device,
        device_resource=device_resource,
        distributed_backend=DISTRIBUTED_BACKEND[spec.device],
        workers=spec.workers,
        devices_per_worker=spec.devices_per_worker,
        world_size=world_size,
        global_batch_size=global_batch,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=training.learning_rate or defaults.learning_rate,
        epochs=training.epochs,
        max_steps=training.max_steps if training.max_steps is not None else defaults.max_steps,
        max_grad_norm=training.max_grad_norm,
        lr_scheduler=training.lr_scheduler,
        warmup_ratio=training.warmup_ratio,
        optimizer=training.optimizer or defaults.optimizer,
        weight_decay=training.weight_decay,
        bf16=training.bf16,
        cutoff_len=spec.dpo.max_length if is_dpo else training.cutoff_len,
        pad_to_multiple_of=training.pad_to_multiple_of,
        eval_steps=training.eval_steps,
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        logging_steps=training.logging_steps,
        seed=training.seed,
        gradient_checkpointing=defaults.gradient_checkpointing
        if training.gradient_checkpointing is None
        else training.gradient_checkpointing,
        padding_free=training.padding_free,
        fused_kernels=training.fused_kernels,
        deepspeed_zero_stage=training.deepspeed_zero_stage,
        lora=None
        if spec.method is Method.FULL
        else ResolvedLora.model_validate(spec.lora.model_dump()),
        quantization=None
        if quantization is None
        else ResolvedQuantization.model_validate(quantization.model_dump()),
        dpo=ResolvedDpo.model_validate(spec.dpo.model_dump()) if is_dpo else None,
        output_path=spec.output.path,
        merge_adapter=spec.output.merge_adapter,
    )


def check_name(name: str) -> None:
    """The name prefixes the worker Service and pod hostnames: a short DNS-1035 label."""
    if not JOB_NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            f"metadata.name {name!r} must be at most {MAX_NAME_LENGTH} characters of lower-case "
            "letters, digits and '-', starting with a letter: it names the worker Service and "
            "prefixes the pods' hostnames.",
        )


def parse_spec(spec: dict[str, Any]) -> FinetuneJobSpec:
    """Validate a spec dict; pydantic's errors become one SpecError naming each bad field."""
    try:
        return FinetuneJobSpec.model_validate(spec)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = "spec." + ".".join(str(part) for part in item["loc"])
            problems.append(f"{where}: {item['msg']}")
        raise SpecError("; ".join(problems)) from None


def load_manifest(text: str) -> dict[str, Any]:
    """The FinetuneJob in a YAML file (the first document of kind FinetuneJob)."""
    for document in yaml.safe_load_all(text):
        if isinstance(document, dict) and document.get("kind") == KIND:
            return document
    raise SpecError(f"no document of kind {KIND} in the file")


def resolve_manifest(
    manifest: dict[str, Any], device_resources: Mapping[str, str] | None = None
) -> ResolvedConfig:
    return resolve(parse_spec(manifest.get("spec") or {}), device_resources)
