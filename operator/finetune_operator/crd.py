"""The CRD, generated from the API model: `finetune-operator crd > crds/finetunejob.yaml`.

The pydantic JSON schema is turned into a structural OpenAPI v3 schema (refs inlined,
optionals collapsed, int-or-string marked, descriptions kept) and the cross-field checks
that CEL can express are added as x-kubernetes-validations, so `kubectl apply` rejects
them with a message a person understands.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune_operator.api import (
    DPO_DEFAULTS,
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SFT_DEFAULTS,
    SHORT_NAME,
    SINGULAR,
    STATUS_FIELDS,
    VERSION,
    FinetuneJobSpec,
)

Schema = dict[str, Any]

_DROPPED_KEYS = {"title", "default"}


def _structural(node: Schema, defs: Schema) -> Schema:
    """Pydantic JSON schema -> Kubernetes structural schema, recursively."""
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return _structural({**options[0], **rest}, defs)
        types = {option.get("type") for option in options}
        if types == {"integer", "string"}:
            # int | Literal["auto"]: the value is checked by a CEL rule on the field.
            int_or_string = _structural(rest, defs)
            int_or_string["x-kubernetes-int-or-string"] = True
            return int_or_string
        raise ValueError(f"cannot express {node} in a structural schema")

    result: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "const":
            result["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # OpenAPI v3.0 (what Kubernetes speaks): a boolean beside minimum/maximum.
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            result[bound] = value
            result[key] = True
        elif key == "properties":
            result["properties"] = {name: _structural(child, defs) for name, child in value.items()}
        elif key == "additionalProperties":
            # A map with typed values (nodeSelector, resource quantities); `false` is pydantic's
            # extra="forbid", which a structural schema expresses by listing properties.
            if isinstance(value, dict):
                result["additionalProperties"] = _structural(value, defs)
        elif key == "items":
            result["items"] = _structural(value, defs)
        else:
            result[key] = value
    if result.get("type") == "object" and not {"properties", "additionalProperties"} & set(result):
        # Passed-through Kubernetes types (resources, affinity, tolerations ...).
        result["x-kubernetes-preserve-unknown-fields"] = True
    if "const" in node and "type" not in result:
        result["type"] = "integer" if isinstance(node["const"], int) else "string"
    return result


def _or_default(path: str, field: str, default: str) -> str:
    """CEL: the field's value, or its default when unset."""
    return f"(has({path}.{field}) ? {path}.{field} : {default})"


def _batch_rule() -> Schema:
    is_dpo = "(has(self.method) && self.method == 'dpo')"
    training = "self.training"
    global_batch = (
        f"(has(self.training) && has({training}.globalBatchSize) ? {training}.globalBatchSize : "
        f"({is_dpo} ? {DPO_DEFAULTS.global_batch_size} : {SFT_DEFAULTS.global_batch_size}))"
    )
    micro = (
        f"(has(self.training) && has({training}.microBatchSize) ? int({training}.microBatchSize) : "
        f"({is_dpo} ? {DPO_DEFAULTS.micro_batch_size} : {SFT_DEFAULTS.micro_batch_size}))"
    )
    world = (
        f"({_or_default('self', 'workers', '1')} * {_or_default('self', 'devicesPerWorker', '1')})"
    )
    auto = f"(has(self.training) && has({training}.microBatchSize) && type({training}.microBatchSize) == string)"
    return {
        # A divisor below 1 is the schema's error to report (minimum 1), not a CEL failure.
        "rule": f"{auto} || {micro} < 1 || {world} < 1 || ({global_batch} % ({micro} * {world}) == 0)",
        # A static message: the API server's CEL cost estimate rejects a messageExpression
        # that formats these numbers (string(int) is costed as unbounded). The operator's
        # Valid condition and `finetune-operator render` name the world sizes that work.
        "message": (
            "the batch rule: training.globalBatchSize must be a multiple of "
            "training.microBatchSize x workers x devicesPerWorker (the world size), so that "
            "gradient accumulation is a whole number >= 1. Choose a world size that divides "
            "globalBatchSize / microBatchSize (defaults: 128 / 2 = 64, so 1, 2, 4, 8, 16, 32 "
            "or 64), or change training.globalBatchSize"
        ),
        "reason": "FieldValueInvalid",
        "fieldPath": ".workers",
    }


def _spec_rules() -> list[Schema]:
    is_dpo = "(has(self.method) && self.method == 'dpo')"
    return [
        _batch_rule(),
        {
            "rule": f"!has(self.dataset.format) || ((self.dataset.format == 'dpo') == {is_dpo})",
            "message": "method dpo takes dataset.format dpo (prompt/chosen/rejected); the other "
            "methods take dataset.format alpaca (instruction/input/output)",
            "fieldPath": ".dataset.format",
        },
        {
            "rule": "!has(self.quantization) || !has(self.method) || "
            "self.method == 'qlora' || self.method == 'dpo'",
            "message": "quantization applies to methods qlora and dpo only: remove it, or use "
            "method qlora",
            "fieldPath": ".quantization",
        },
        {
            "rule": "!has(self.training) || !has(self.training.deepspeedZeroStage) || "
            "(has(self.method) && self.method == 'full')",
            "message": "training.deepspeedZeroStage applies to method full only",
            "fieldPath": ".training.deepspeedZeroStage",
        },
        {
            "rule": "!has(self.device) || self.device != 'cpu' || !has(self.deviceResource)",
            "message": "device cpu requests no accelerator: remove deviceResource",
            "fieldPath": ".deviceResource",
        },
    ]


def spec_schema() -> Schema:
    raw = FinetuneJobSpec.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _structural(raw, defs)
    schema["description"] = "What to fine-tune, on what, and how."
    schema["x-kubernetes-validations"] = _spec_rules()
    training = schema["properties"]["training"]["properties"]
    training["microBatchSize"]["x-kubernetes-validations"] = [
        {
            "rule": "type(self) == int ? self >= 1 : self == 'auto'",
            "message": "microBatchSize is a whole number >= 1 or 'auto'",
        }
    ]
    for immutable in ("method",):
        schema["properties"][immutable]["x-kubernetes-validations"] = [
            {
                "rule": "self == oldSelf",
                "message": f"{immutable} cannot be changed: create a new FinetuneJob",
            }
        ]
    schema["properties"]["model"]["x-kubernetes-validations"] = [
        {
            "rule": "self.name == oldSelf.name",
            "message": "model.name cannot be changed: create a new FinetuneJob",
        }
    ]
    return schema


def crd() -> Schema:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {
            "name": "Workers",
            "type": "string",
            "jsonPath": ".status.workers.summary",
            "description": "ready/desired",
        },
        {
            "name": "Step",
            "type": "string",
            "jsonPath": ".status.progress.summary",
            "description": "step/maxSteps",
        },
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
        # the ranks the workers started (a rank per visible device: a Max card's two stacks)
        {"name": "World", "type": "integer", "jsonPath": ".status.worldSize", "priority": 1},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["all", "finetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A distributed fine-tuning job: a model, a data "
                            "set and a method, run as a group of worker pods.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {
                                    "rule": "self.metadata.name.matches("
                                    "'^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                                    "message": "metadata.name must be lower-case letters, "
                                    "digits and '-', starting with a letter (no dots): it names "
                                    "the worker Service",
                                },
                                {
                                    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                                    "message": f"metadata.name must be at most {MAX_NAME_LENGTH} "
                                    "characters: it prefixes the worker pods' hostnames",
                                },
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": {
                                    "type": "object",
                                    "description": "What the operator and the trainer observed.",
                                    "properties": STATUS_FIELDS,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `finetune-operator crd` from finetune_operator/api.py: do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
