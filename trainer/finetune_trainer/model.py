"""Tokenizer and model for each method: qlora (4-bit nf4 + LoRA), lora, full, dpo (LoRA).

Hub ids and local folders both load through `from_pretrained`; `bundled://tiny-llama` is the
tiny example model (see tiny.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from finetune_operator.api import Method
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer.data import SourceUnreachable
from finetune_trainer.device import DeviceInfo, ipex_llm_available
from finetune_trainer.tiny import resolve_bundled

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """model.name names no model this process can load. The message says what to give."""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _is_not_found(error: BaseException) -> bool:
    """A missing or malformed model name, as opposed to a transient failure worth a retry."""
    names = {type(e).__name__ for e in (error, error.__cause__) if e is not None}
    text = str(error)
    return bool(
        names & {"HFValidationError", "RepositoryNotFoundError", "GatedRepoError"}
        or "is not a local folder" in text
        or "Repo id must" in text
        or "not a valid model identifier" in text
    )


def compute_dtype(config: ResolvedConfig) -> torch.dtype:
    return torch.bfloat16 if config.bf16 else torch.float32


def _hub_kwargs(config: ResolvedConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.model_revision:
        kwargs["revision"] = config.model_revision
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    return kwargs


def load_tokenizer(config: ResolvedConfig) -> Any:
    """The model's tokenizer, with a pad token the way IPEX-LLM's alpaca example sets one.

    That example sets pad_token_id = 0 (Llama's <unk>) so padding differs from EOS, which the
    model must learn to emit; without an unk token, EOS it is. Padding is on the right.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_bundled(config.model_name), **_hub_kwargs(config)
        )
    except (OSError, ValueError) as error:
        local = Path(resolve_bundled(config.model_name)).expanduser()
        if local.is_dir():  # a folder that is there but holds no loadable tokenizer/config
            raise ModelError(
                f"model.name {config.model_name}: the folder could not be loaded "
                f"({type(error).__name__}: {_first_line(error)}): give the folder "
                "save_pretrained wrote for the model and its tokenizer"
            ) from None
        if "couldn't connect" in str(error).lower():
            raise SourceUnreachable(
                f"model.name {config.model_name}: the hub cannot be reached from here and the "
                "model is not in the local cache; check the network (or HF_HUB_OFFLINE), or "
                "give a local model folder"
            ) from None
        if not _is_not_found(error):
            raise
        raise ModelError(
            f"model.name {config.model_name}: not found (no such local folder, and the hub "
            f"has no such model or it is not reachable from here: {_first_line(error)}): give "
            "a model folder save_pretrained wrote, or a hub id such as meta-llama/Llama-2-7b-hf "
            "(with hfTokenSecret for gated models)"
        ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError(
                f"tokenizer of {config.model_name} has no pad, unk or eos token to pad with"
            )
        log.info(
            "tokenizer has no pad token: padding with %r (id %d)",
            tokenizer.pad_token,
            tokenizer.pad_token_id,
        )
    tokenizer.padding_side = "right"
    return tokenizer


def lora_config(config: ResolvedConfig) -> Any:
    from peft import LoraConfig

    assert config.lora is not None
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _quantization_config(config: ResolvedConfig) -> Any:
    from transformers import BitsAndBytesConfig

    assert config.quantization is not None
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization.type,
        bnb_4bit_use_double_quant=config.quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(config),
        bnb_4bit_quant_storage=compute_dtype(config),
    )


def load_base_model(config: ResolvedConfig, device: DeviceInfo, quantize: bool = True) -> Any:
    """The base causal LM on this rank's device, 4-bit where config.quantization says so."""
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(config) | {"dtype": compute_dtype(config), "attn_implementation": "sdpa"}
    if quantize and config.quantization is not None:
        if _uses_ipex_llm(config, device):
            from ipex_llm.transformers import AutoModelForCausalLM as LowBitModel

            # ipex-llm's own nf4 kernels for Intel GPUs; the adapter code below is the same.
            low_bit = LowBitModel.from_pretrained(
                resolve_bundled(config.model_name),
                load_in_low_bit=config.quantization.type,
                optimize_model=False,
                modules_to_not_convert=["lm_head"],
                torch_dtype=compute_dtype(config),
                **_hub_kwargs(config),
            )
            low_bit.config.use_cache = False
            return low_bit.to(device.torch_device)
        kwargs["quantization_config"] = _quantization_config(config)
        # Each DDP rank holds a whole copy on its own device.
        kwargs["device_map"] = {"": str(device.torch_device)}
    model: Any = AutoModelForCausalLM.from_pretrained(resolve_bundled(config.model_name), **kwargs)
    if not (quantize and config.quantization is not None):
        model = model.to(device.torch_device)
    model.config.use_cache = False  # no KV cache while training
    return model


def _uses_ipex_llm(config: ResolvedConfig, device: DeviceInfo) -> bool:
    return config.quantization is not None and device.kind == "xpu" and ipex_llm_available()


def prepare_model(config: ResolvedConfig, device: DeviceInfo) -> Any:
    """The model to train: LoRA-wrapped for qlora/lora; dpo gets its adapter from TRL."""
    if _uses_ipex_llm(config, device):
        # ipex-llm's low-bit layers need its own versions of these two peft functions.
        from ipex_llm.transformers.qlora import get_peft_model, prepare_model_for_kbit_training
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base_model(config, device)
    if config.quantization is not None:
        # Casts norms to fp32 and makes inputs require grad, as IPEX-LLM's QLoRA example does.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing and config.method is not Method.FULL:
        model.enable_input_require_grads()
    if config.method in (Method.QLORA, Method.LORA):
        model = get_peft_model(model, lora_config(config))
        model.print_trainable_parameters()
    return model
