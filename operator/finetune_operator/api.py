"""The FinetuneJob API: the spec users write, and every hyperparameter default.

This module is the one place that holds the defaults. The CRD (`finetune-operator crd`),
the operator and the trainer all read it, so it imports neither torch nor kubernetes.

Defaults follow Intel IPEX-LLM's QLoRA alpaca fine-tuning example
(`alpaca_qlora_finetuning.py`) and its training hyperparameters:

    micro-batch 2 per device, global batch 128, lr 3e-5, max_grad_norm 0.3, bf16,
    cosine schedule, adamw_torch, 3 epochs, cutoff 256 tokens, pad_to_multiple_of 8,
    eval/save every 100 steps, save_total_limit 100, seed 42,
    LoRA r 8 / alpha 16 / dropout 0.05 on q,k,v,o,gate,up,down projections,
    QLoRA 4-bit nf4 with double quantization.

`method: dpo` has its own (from IPEX-LLM's DPO example, `dpo_finetuning.py`):

    micro-batch 4, global batch 16, lr 5e-5, max 200 steps, beta 0.1,
    max prompt length 1024, max length 1536.

Fields whose default depends on the method are `None` in the spec and filled in by
`finetune_operator.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FinetuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAME = "ftj"

# Worker pod hostnames are "<name>-worker-<index>": a DNS label holds 63 characters.
MAX_NAME_LENGTH = 40


class Method(str, Enum):
    QLORA = "qlora"
    LORA = "lora"
    FULL = "full"
    DPO = "dpo"


class Device(str, Enum):
    XPU = "xpu"
    CUDA = "cuda"
    CPU = "cpu"


class DatasetFormat(str, Enum):
    ALPACA = "alpaca"
    DPO = "dpo"


@dataclass(frozen=True)
class TrainingDefaults:
    """Method-dependent defaults; `SFT_DEFAULTS` and `DPO_DEFAULTS` are the two sets."""

    global_batch_size: int
    micro_batch_size: int
    learning_rate: float
    optimizer: Optimizer
    max_steps: int | None
    gradient_checkpointing: bool


SFT_DEFAULTS = TrainingDefaults(
    global_batch_size=128,
    micro_batch_size=2,
    learning_rate=3e-5,
    optimizer="adamw_torch",
    max_steps=None,
    gradient_checkpointing=False,
)
# IPEX-LLM's `dpo_finetuning.py` asks for "adamw_hf", which transformers removed; adamw_torch
# is the same algorithm.
DPO_DEFAULTS = TrainingDefaults(
    global_batch_size=16,
    micro_batch_size=4,
    learning_rate=5e-5,
    optimizer="adamw_torch",
    max_steps=200,
    # TRL's DPOConfig checkpoints by default: a DPO micro-batch is chosen + rejected sequences
    # of up to maxLength tokens, and without it the activations double the peak memory.
    gradient_checkpointing=True,
)

DEFAULT_DEVICE_RESOURCE = {
    Device.XPU: "gpu.intel.com/i915",
    Device.CUDA: "nvidia.com/gpu",
}
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
DEFAULT_VALIDATION_SIZE = 2000
DEFAULT_OUTPUT_PATH = "/output"

LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "lion_32bit",
    "lion_8bit",
]


class _Spec(BaseModel):
    """Base for spec objects: camelCase on the wire, unknown fields are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
    )


class ModelSpec(_Spec):
    name: str = Field(
        min_length=1,
        description="Hugging Face model id (e.g. meta-llama/Llama-2-7b-hf) or an absolute path "
        "to a model folder on a mounted volume.",
    )
    revision: str | None = Field(
        default=None, description="Git revision (branch, tag or commit) of a hub model."
    )


class DatasetSpec(_Spec):
    name: str = Field(
        min_length=1,
        description="Hugging Face dataset id, or a path to a JSON/JSONL file or a folder of them.",
    )
    format: DatasetFormat | None = Field(
        default=None,
        description="Row format. alpaca: instruction/input/output. dpo: prompt/chosen/rejected. "
        "Default: dpo for method dpo, alpaca otherwise.",
    )
    validation_size: float | None = Field(
        default=None,
        ge=0,
        description=f"Rows held out for evaluation: a count (>= 1) or a fraction (< 1) of the "
        f"data set. 0 turns evaluation off. Default: {DEFAULT_VALIDATION_SIZE} rows.",
    )
    train_on_inputs: bool = Field(
        default=True,
        description="alpaca only: compute the loss on the prompt (instruction and input) too, "
        "not only on the response. Default: true, as in IPEX-LLM's QLoRA alpaca example "
        "(alpaca_qlora_finetuning.py).",
    )


class TrainingSpec(_Spec):
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Examples per optimizer step, kept constant whatever the world size. "
        f"Default: {SFT_DEFAULTS.global_batch_size} (dpo: {DPO_DEFAULTS.global_batch_size}).",
    )
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None,
        description="Examples per device per forward pass, or 'auto': on cuda and xpu (lora, "
        "qlora, full) the largest that fits the device's memory, measured by the trainer at "
        "start; on cpu and for dpo the largest up to 4 (the global batch is kept either way). "
        "Gradient accumulation is derived: "
        "globalBatchSize / (microBatchSize x workers x devicesPerWorker). "
        f"Default: {SFT_DEFAULTS.micro_batch_size} (dpo: {DPO_DEFAULTS.micro_batch_size}).",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"Peak learning rate. Default: {SFT_DEFAULTS.learning_rate} "
        f"(dpo: {DPO_DEFAULTS.learning_rate}).",
    )
    epochs: float = Field(default=3, gt=0, description="Passes over the training data. Default: 3.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps to train; overrides epochs when set. "
        f"Default: unset (dpo: {DPO_DEFAULTS.max_steps}).",
    )
    max_grad_norm: float = Field(
        default=0.3,
        ge=0,
        description="Gradient clipping norm; tight because 4-bit weights make gradients noisy. "
        "Default: 0.3.",
    )
    lr_scheduler: LrScheduler = Field(
        default="cosine",
        description="Learning-rate schedule (transformers SchedulerType name). Default: cosine.",
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of steps spent warming up. Default: 0."
    )
    optimizer: Optimizer | None = Field(
        default=None,
        description="Optimizer (transformers OptimizerNames). Default: adamw_torch.",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay. Default: 0.")
    bf16: bool = Field(
        default=True, description="Train in bfloat16 mixed precision. Default: true."
    )
    cutoff_len: int = Field(
        default=256,
        ge=8,
        description="Maximum tokens per example; longer ones are truncated. Default: 256 "
        "(dpo uses dpo.maxLength).",
    )
    pad_to_multiple_of: int = Field(
        default=8, ge=1, description="Pad batches to a multiple of this many tokens. Default: 8."
    )
    eval_steps: int = Field(default=100, ge=1, description="Evaluate every N steps. Default: 100.")
    save_steps: int = Field(
        default=100,
        ge=1,
        description="Checkpoint every N steps: a restart loses at most this much work. "
        "Default: 100.",
    )
    save_total_limit: int = Field(
        default=100, ge=1, description="Checkpoints kept on the volume. Default: 100."
    )
    logging_steps: int = Field(default=1, ge=1, description="Log every N steps. Default: 1.")
    seed: int = Field(default=42, ge=0, description="Random seed. Default: 42.")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass to save memory at ~30% more "
        f"compute. Default: {str(SFT_DEFAULTS.gradient_checkpointing).lower()} "
        f"(dpo: {str(DPO_DEFAULTS.gradient_checkpointing).lower()}, as TRL's DPOConfig; on "
        "CUDA it runs inside the graphs of the decoder stack).",
    )
    padding_free: bool = Field(
        default=True,
        description="Pack each micro-batch into one sequence without padding (position ids "
        "restart per example, attention stays within examples). Exact; faster. Default: true.",
    )
    fused_kernels: bool = Field(
        default=True,
        description="Use fused kernels where installed, at any number of devices: on CUDA, "
        "compiled decoder layers, replayed as graphs of the whole stack at a fixed micro-batch "
        "whose packed row is at most 1024 tokens, else with Liger's fused cross-entropy; dpo: "
        "graphs of the decoder stack with Liger's layers and LoRA without peft's fp32 round "
        "trip (gradient checkpointing, if on, inside the graphs). On XPU these are written "
        "against torch.xpu but off unless the pod sets FINETUNE_XPU_EXPERIMENTAL=1; XPU always "
        "gets packing, fused AdamW and no host syncs per micro-batch. Default: true.",
    )
    deepspeed_zero_stage: int | None = Field(
        default=None,
        ge=0,
        le=3,
        description="method full only: shard optimizer state (1), gradients (2) and weights (3) "
        "with DeepSpeed ZeRO. Default: unset (plain DDP).",
    )


class LoraSpec(_Spec):
    r: int = Field(default=8, ge=1, description="LoRA rank. Default: 8.")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha (scale = alpha / r). Default: 16.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout. Default: 0.05.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Module names that get adapters. Default: "
        + ", ".join(DEFAULT_TARGET_MODULES)
        + ".",
    )


class QuantizationSpec(_Spec):
    bits: Literal[4] = Field(default=4, description="Weight bits. Only 4 is supported.")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit type. Default: nf4.")
    double_quant: bool = Field(
        default=True, description="Quantize the quantization constants too. Default: true."
    )


DPO_MAX_PROMPT_LENGTH, DPO_MAX_LENGTH = 1024, 1536
DPO_LENGTHS_MESSAGE = (
    f"dpo.maxPromptLength must be below dpo.maxLength (defaults {DPO_MAX_PROMPT_LENGTH} and "
    f"{DPO_MAX_LENGTH}): a prompt "
    "that fills the sequence leaves no response to train on; lower maxPromptLength or raise "
    "maxLength"
)


class DpoSpec(_Spec):
    beta: float = Field(
        default=0.1, gt=0, description="Strength of the KL penalty to the reference. Default: 0.1."
    )
    max_prompt_length: int = Field(
        default=DPO_MAX_PROMPT_LENGTH,
        ge=1,
        description=f"Maximum prompt tokens. Default: {DPO_MAX_PROMPT_LENGTH}.",
    )
    max_length: int = Field(
        default=DPO_MAX_LENGTH,
        ge=2,
        description=f"Maximum prompt plus response tokens. Default: {DPO_MAX_LENGTH}.",
    )

    # The same check as a CEL rule in the CRD, so `kubectl apply` refuses it first.
    model_config = ConfigDict(
        **_Spec.model_config,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"(has(self.maxPromptLength) ? self.maxPromptLength : "
                    f"{DPO_MAX_PROMPT_LENGTH}) < (has(self.maxLength) ? self.maxLength : "
                    f"{DPO_MAX_LENGTH})",
                    "message": DPO_LENGTHS_MESSAGE,
                    "fieldPath": ".maxPromptLength",
                }
            ]
        },
    )

    @model_validator(mode="after")
    def _prompt_leaves_room(self) -> DpoSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(DPO_LENGTHS_MESSAGE)
        return self


class OutputSpec(_Spec):
    volume_claim: str | None = Field(
        default=None,
        description="PersistentVolumeClaim (ReadWriteMany across nodes) for checkpoints and the "
        "final adapter. Unset: an emptyDir, lost with the pods.",
    )
    path: str = Field(
        default=DEFAULT_OUTPUT_PATH,
        pattern=r"^/",
        description=f"Absolute mount path of the volume in the pods. Default: {DEFAULT_OUTPUT_PATH}.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="lora/qlora: also save the base model with the adapter merged in. "
        "Default: false.",
    )


# A Kubernetes quantity: 2, "500m", "64Gi".
Quantity = int | str


class ResourceRequirements(_Spec):
    limits: dict[str, Quantity] | None = Field(
        default=None, description="Most of each resource a worker may use (e.g. memory: 64Gi)."
    )
    requests: dict[str, Quantity] | None = Field(
        default=None, description="Resources the scheduler reserves for each worker."
    )


class SecretKeyRef(_Spec):
    name: str = Field(min_length=1, description="Secret name, in the FinetuneJob's namespace.")
    key: str = Field(
        default="token", min_length=1, description="Key in the Secret. Default: token."
    )


class FinetuneJobSpec(_Spec):
    method: Method = Field(
        default=Method.QLORA, description="qlora, lora, full or dpo. Default: qlora."
    )
    model: ModelSpec = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="The training data.")
    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Worker pods, one per node. Editing it restarts the group at the new world "
        "size from the last checkpoint. Default: 1.",
    )
    devices_per_worker: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Accelerators per pod; world size = workers x devicesPerWorker. Default: 1.",
    )
    device: Device = Field(default=Device.XPU, description="Accelerator kind. Default: xpu.")
    device_resource: str | None = Field(
        default=None,
        description="Extended resource requested per device. Default: gpu.intel.com/i915 for xpu "
        "(gpu.intel.com/xe on the Xe kernel driver), nvidia.com/gpu for cuda, none for cpu.",
    )
    image: str | None = Field(
        default=None, description="Trainer image. Default: the operator's configured image."
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="CPU and memory of each worker (core ResourceRequirements); the device "
        "resource is added by the operator.",
    )
    node_selector: dict[str, str] | None = Field(default=None, description="Passed to the pods.")
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, description="Passed to the pods."
    )
    affinity: dict[str, Any] | None = Field(default=None, description="Passed to the pods.")
    priority_class_name: str | None = Field(default=None, description="Passed to the pods.")
    service_account_name: str | None = Field(
        default=None,
        description="Service account of the pods. Default: one the operator creates, allowed "
        "only to report this job's progress.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="LoRA adapter (qlora, lora and dpo)."
    )
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="Weight quantization. qlora: always 4-bit nf4 with double quantization "
        "unless set here; dpo: off unless set; lora and full: not allowed.",
    )
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="DPO settings (method dpo).")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    hf_token_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret holding a Hugging Face token, given to the pods as HF_TOKEN; "
        "never logged or copied into status.",
    )
    suspend: bool = Field(
        default=False,
        description="true stops the pods and keeps the job; false resumes from the last "
        "checkpoint. Default: false.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the job's pods and service this long after it ends. Default: unset.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        description="Whole-group restarts from the last checkpoint before the job fails. "
        "Default: 3.",
    )


class Phase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    # Kueue holds the worker Job: waiting for quota, or stopped by a preemption until re-admitted.
    QUEUED = "Queued"
    PREEMPTED = "Preempted"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionType(str, Enum):
    VALID = "Valid"
    CREATED = "Created"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"


# Status fields (status.*) as the CRD shows them; the operator and the trainer write them.
STATUS_FIELDS: dict[str, dict[str, Any]] = {
    "phase": {
        "type": "string",
        "enum": [p.value for p in Phase],
        "description": "Pending, Queued, Running, Restarting, Preempted, Suspended, Succeeded or "
        "Failed.",
    },
    "observedGeneration": {"type": "integer", "description": "Spec generation last acted on."},
    "workers": {
        "type": "object",
        "description": "Worker pods.",
        "properties": {
            "desired": {"type": "integer", "description": "Workers the spec asks for."},
            "ready": {"type": "integer", "description": "Workers running now."},
            "summary": {"type": "string", "description": "ready/desired, for kubectl get."},
        },
    },
    "resolved": {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "description": "Every effective hyperparameter after defaults and the batch rule, "
        "world size and gradientAccumulationSteps included.",
    },
    "progress": {
        "type": "object",
        "description": "Live training progress, reported by rank 0.",
        "properties": {
            "step": {"type": "integer", "description": "Optimizer steps done."},
            "maxSteps": {"type": "integer", "description": "Optimizer steps in the run."},
            "summary": {"type": "string", "description": "step/maxSteps, for kubectl get."},
            "epoch": {"type": "number", "description": "Epochs done (fractional)."},
            "loss": {"type": "number", "description": "Training loss of the last step."},
            "evalLoss": {"type": "number", "description": "Last evaluation loss."},
            "learningRate": {"type": "number", "description": "Current learning rate."},
            "tokensPerSecond": {"type": "number", "description": "Training tokens per second."},
            "updatedAt": {"type": "string", "description": "When rank 0 last reported."},
        },
    },
    "checkpoint": {
        "type": "object",
        "description": "Latest complete checkpoint on the output volume.",
        "properties": {
            "latest": {"type": "string", "description": "Path of the checkpoint."},
            "step": {"type": "integer", "description": "Step it was saved at."},
        },
    },
    "restarts": {"type": "integer", "description": "Whole-group restarts so far."},
    "lastFailure": {
        "type": "object",
        "description": "The worker failure that caused the last group restart (or the failure).",
        "properties": {
            "pod": {"type": "string", "description": "The pod that failed first."},
            "reason": {"type": "string", "description": "Why it failed (pod or container reason)."},
            "message": {"type": "string", "description": "What the pod or its container said."},
            "exitCode": {"type": "integer", "description": "Exit code of the trainer, if it ran."},
            "time": {"type": "string", "format": "date-time", "description": "When it was seen."},
            "jobUid": {
                "type": "string",
                "description": "uid of the worker Job that failed: counts each failure once.",
            },
        },
    },
    "worldSize": {
        "type": "integer",
        "description": "World size of the running group: the ranks the workers started (each "
        "starts one per device it sees), workers x devicesPerWorker until they report.",
    },
    "ranks": {
        "type": "object",
        "description": "What the workers started, reported by rank 0 before training: each "
        "worker starts a rank per device it sees (each stack of a multi-stack GPU is one).",
        "properties": {
            "worldSize": {"type": "integer", "description": "Ranks in all."},
            "workers": {"type": "integer", "description": "Workers in the rendezvous."},
            "summary": {
                "type": "string",
                "description": "How the world size came about, e.g. 4 workers x 2 cards x "
                "2 stacks = 16 ranks.",
            },
            "gradientAccumulationSteps": {
                "type": "integer",
                "description": "Accumulation at that world size (the global batch is kept).",
            },
            "configHash": {"type": "string", "description": "The config the workers ran."},
            "reason": {"type": "string", "description": "Set when the trainer refused to train."},
            "message": {"type": "string", "description": "Why, and the world sizes that work."},
        },
    },
    "startTime": {"type": "string", "format": "date-time", "description": "When training began."},
    "completionTime": {
        "type": "string",
        "format": "date-time",
        "description": "When the job succeeded or failed.",
    },
    "conditions": {
        "type": "array",
        "description": "Valid, Created, Running, Succeeded, Failed, Suspended, Queued.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string", "description": "Condition type."},
                "status": {
                    "type": "string",
                    "enum": ["True", "False", "Unknown"],
                    "description": "True, False or Unknown.",
                },
                "reason": {"type": "string", "description": "CamelCase reason."},
                "message": {"type": "string", "description": "What happened, what to do."},
                "lastTransitionTime": {
                    "type": "string",
                    "format": "date-time",
                    "description": "When status last changed.",
                },
                "observedGeneration": {
                    "type": "integer",
                    "description": "Spec generation it was set for.",
                },
            },
        },
    },
}
