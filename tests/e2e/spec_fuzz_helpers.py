"""Generated FinetuneJobs for the property tests (test_spec_fuzz.py against the API server,
test_spec_fuzz_operator.py through the running operator), and what the core renders them into.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from finetune_operator.api import API_VERSION, KIND, MAX_NAME_LENGTH
from finetune_operator.objects import JobRef, build_desired_objects
from finetune_operator.resolve import check_name, parse_spec, resolve
from finetune_operator.settings import OperatorSettings

# A spec with only the required fields.
BASE = {"model": {"name": "meta-llama/Llama-2-7b-hf"}, "dataset": {"name": "yahma/alpaca-cleaned"}}

# ------------------------------------------------------------------------------------------
# Strategies: a spec whose every field is valid on its own (cross-field combinations are
# free: method x format x quantization x deepspeed, device x deviceResource, the batch rule),
# then up to two mutations, each a wrong type, a value out of bounds, or a value that the
# schema cannot see is wrong (names, paths, passed-through Kubernetes fields).


def optional_fields(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


VALID_TRAINING = {
    "globalBatchSize": st.sampled_from([8, 16, 32, 64, 96, 128]),
    "microBatchSize": st.sampled_from([1, 2, 4, 3, "auto"]),
    "learningRate": st.floats(1e-6, 1.0),
    "epochs": st.floats(0.1, 10),
    "maxSteps": st.integers(1, 10_000),
    "maxGradNorm": st.floats(0, 10),
    "lrScheduler": st.sampled_from(["cosine", "linear", "constant"]),
    "warmupRatio": st.floats(0, 1),
    "optimizer": st.sampled_from(["adamw_torch", "sgd", "adafactor"]),
    "weightDecay": st.floats(0, 1),
    "bf16": st.booleans(),
    "cutoffLen": st.integers(8, 4096),
    "padToMultipleOf": st.integers(1, 64),
    "evalSteps": st.integers(1, 500),
    "saveSteps": st.integers(1, 500),
    "saveTotalLimit": st.integers(1, 100),
    "loggingSteps": st.integers(1, 100),
    "seed": st.integers(0, 2**31),
    "gradientCheckpointing": st.booleans(),
    "paddingFree": st.booleans(),
    "fusedKernels": st.booleans(),
    "deepspeedZeroStage": st.integers(0, 3),
}
VALID_SPEC = {
    "method": st.sampled_from(["qlora", "lora", "full", "dpo"]),
    "workers": st.sampled_from([1, 2, 3, 4, 8, 16]),
    "devicesPerWorker": st.sampled_from([1, 2, 4, 8]),
    "device": st.sampled_from(["xpu", "cuda", "cpu"]),
    "deviceResource": st.sampled_from(["gpu.intel.com/i915", "gpu.intel.com/xe", "nvidia.com/gpu"]),
    "image": st.sampled_from(
        ["ghcr.io/acme/trainer:1.0", "registry.local:5000/t@sha256:" + "a" * 64]
    ),
    "resources": st.sampled_from(
        [
            {},
            {"limits": {"cpu": "8", "memory": "64Gi"}, "requests": {"cpu": "4", "memory": "32Gi"}},
            {"requests": {"cpu": 2}},
        ]
    ),
    "nodeSelector": st.sampled_from([{"finetune.dev/accelerator": "xpu"}, {}]),
    "tolerations": st.just([{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    "affinity": st.just(
        {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]}
                    ]
                }
            }
        }
    ),
    "priorityClassName": st.just("system-cluster-critical"),
    "serviceAccountName": st.just("custom-trainer"),
    "training": optional_fields(VALID_TRAINING),
    "lora": optional_fields(
        {
            "r": st.integers(1, 256),
            "alpha": st.integers(1, 512),
            "dropout": st.floats(0, 0.99),
            "targetModules": st.lists(
                st.sampled_from(["q_proj", "v_proj", "k_proj"]), min_size=1, max_size=3
            ),
        }
    ),
    "quantization": optional_fields(
        {"bits": st.just(4), "type": st.sampled_from(["nf4", "fp4"]), "doubleQuant": st.booleans()}
    ),
    "dpo": optional_fields(
        {
            "beta": st.floats(0.01, 1),
            "maxPromptLength": st.integers(1, 2048),
            "maxLength": st.integers(2, 4096),
        }
    ),
    "output": optional_fields(
        {
            "volumeClaim": st.just("finetune-output"),
            "path": st.sampled_from(["/output", "/data/out", "/mnt/x"]),
            "mergeAdapter": st.booleans(),
        }
    ),
    "hfTokenSecret": optional_fields({"key": st.sampled_from(["token", "hf_token"])}).map(
        lambda extra: {"name": "hf-token", **extra}
    ),
    "suspend": st.booleans(),
    "ttlSecondsAfterFinished": st.integers(0, 86400),
    "backoffLimit": st.integers(0, 10),
}
VALID_MODEL = optional_fields({"revision": st.sampled_from(["main", "v1.0"])}).map(
    lambda extra: {"name": "meta-llama/Llama-2-7b-hf", **extra}
)
VALID_DATASET = optional_fields(
    {
        "format": st.sampled_from(["alpaca", "dpo"]),
        "validationSize": st.sampled_from([0, 0.1, 0.5, 1, 100, 2000]),
        "trainOnInputs": st.booleans(),
    }
).map(lambda extra: {"name": "yahma/alpaca-cleaned", **extra})

dns_label = st.from_regex(r"\A[a-z]([a-z0-9-]{0,10}[a-z0-9])?\Z", fullmatch=True)
# Legal FinetuneJob names (DNS-1123 subdomains) that are awkward for the children's names,
# and names just around the CRD's length limit.
AWKWARD_NAMES = st.one_of(
    st.from_regex(r"\A[0-9][a-z0-9]{0,8}\Z", fullmatch=True),
    st.from_regex(r"\A[a-z]{1,6}\.[a-z]{1,6}\Z", fullmatch=True),
    st.integers(MAX_NAME_LENGTH - 1, 63).map(lambda n: "j" * n),
)

WRONG_TYPE = st.sampled_from(["4", True, 2.5, [1], {"a": 1}, "yes"])

# (path in the spec, bad values, kind). kind "type": a wrong JSON type, which pydantic's lax
# mode may coerce ("4" -> 4) but the API server must reject.
MUTATIONS: list[tuple[tuple[str, ...], st.SearchStrategy[Any], str]] = [
    (("method",), st.sampled_from(["sft", "QLORA"]), "enum"),
    (("workers",), st.sampled_from([0, -1, 1025]), "bound"),
    (("workers",), WRONG_TYPE, "type"),
    (("devicesPerWorker",), st.sampled_from([0, 65]), "bound"),
    (("device",), st.just("tpu"), "enum"),
    (
        ("deviceResource",),
        st.sampled_from(["gpu", "", "example.com/bad name", "kubernetes.io/gpu"]),
        "k8s",
    ),
    (("image",), st.sampled_from(["", " padded ", "UPPER/Case:tag"]), "k8s"),
    (
        ("resources",),
        st.sampled_from(
            [
                {"requests": {"cpu": "lots"}},
                {"limits": {"memory": "1Gi"}, "requests": {"memory": "2Gi"}},
                {"claims": 1},
                {"limits": 1},
            ]
        ),
        "k8s",
    ),
    (("nodeSelector",), st.sampled_from([{"bad key!": "v"}, {"k": "bad value!"}, {"k": 1}]), "k8s"),
    (
        ("tolerations",),
        st.sampled_from(
            [[{"operator": "Bogus"}], [{"key": "k", "value": "v", "operator": "Exists"}], [1]]
        ),
        "k8s",
    ),
    (("affinity",), st.sampled_from([{"nodeAffinity": {"bogus": 1}}, {"podAffinity": "x"}]), "k8s"),
    (("priorityClassName",), st.just("Bad_Class"), "k8s"),
    (("serviceAccountName",), st.sampled_from(["Bad_SA", ""]), "k8s"),
    (("model",), st.sampled_from([{}, {"name": ""}]), "bound"),
    (("model", "name"), st.just(7), "type"),
    (("dataset",), st.sampled_from([{}, {"name": ""}]), "bound"),
    (("dataset", "format"), st.just("sharegpt"), "enum"),
    (("dataset", "validationSize"), st.sampled_from([-1, 2.5]), "bound"),
    (("dataset", "validationSize"), st.just("10"), "type"),
    (("training", "globalBatchSize"), st.sampled_from([0, -8]), "bound"),
    (("training", "microBatchSize"), st.sampled_from([0, -1, "big", ""]), "bound"),
    (("training", "microBatchSize"), st.just(1.5), "type"),
    (("training", "learningRate"), st.sampled_from([0, -1e-5, 1.5]), "bound"),
    (("training", "learningRate"), st.just("fast"), "type"),
    (("training", "epochs"), st.sampled_from([0, -1]), "bound"),
    (("training", "maxSteps"), st.sampled_from([0, -1]), "bound"),
    (("training", "lrScheduler"), st.just("sawtooth"), "enum"),
    (("training", "warmupRatio"), st.sampled_from([-0.1, 1.1]), "bound"),
    (("training", "optimizer"), st.just("adam"), "enum"),
    (("training", "bf16"), st.sampled_from(["yes", 1]), "type"),
    (("training", "cutoffLen"), st.integers(0, 7), "bound"),
    (("training", "saveSteps"), st.just(0), "bound"),
    (("training", "seed"), st.sampled_from([-1, 2**63 - 1, 2**64]), "bound"),
    (("training", "deepspeedZeroStage"), st.sampled_from([-1, 4]), "bound"),
    (("training", "bogusField"), st.just(1), "unknown"),
    (("lora", "r"), st.just(0), "bound"),
    (("lora", "dropout"), st.sampled_from([1.0, -0.1]), "bound"),
    (("lora", "targetModules"), st.just([]), "bound"),
    (("lora", "targetModules"), st.just("q_proj"), "type"),
    (("quantization", "bits"), st.sampled_from([8, 2]), "enum"),
    (("quantization", "type"), st.just("int8"), "enum"),
    (("dpo", "beta"), st.sampled_from([0, -1]), "bound"),
    (("dpo", "maxLength"), st.sampled_from([0, 1]), "bound"),
    (("output", "volumeClaim"), st.sampled_from(["Bad_Claim", ""]), "k8s"),
    (("output", "path"), st.just("relative/out"), "bound"),
    # Absolute, so the schema's ^/ passes, but each collides with a mount of the worker pod
    # or is a path the kubelet refuses.
    (
        ("output", "path"),
        st.sampled_from(["/tmp", "/etc/finetune", "/dev/shm", "/a/../b", "/"]),
        "k8s",
    ),
    (
        ("hfTokenSecret",),
        st.sampled_from(
            [{"name": ""}, {"key": "token"}, {"name": "Bad Name"}, {"name": "ok", "key": "bad key"}]
        ),
        "k8s",
    ),
    (("suspend",), st.just("no"), "type"),
    (("ttlSecondsAfterFinished",), st.just(-1), "bound"),
    (("backoffLimit",), st.just(-1), "bound"),
    (("bogusTopLevel",), st.just("x"), "unknown"),
]


@st.composite
def generated_jobs(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """(name, spec, mutation kinds applied)."""
    name = draw(AWKWARD_NAMES if draw(st.integers(0, 9)) == 0 else dns_label)
    spec: dict[str, Any] = {"model": draw(VALID_MODEL), "dataset": draw(VALID_DATASET)}
    spec.update(draw(optional_fields(VALID_SPEC)))
    kinds = []
    for path, bad, kind in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        target = spec
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = draw(bad)
        kinds.append(f"{kind}:{'.'.join(path)}")
    return name, spec, kinds


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def render(name: str, namespace: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    parsed = parse_spec(spec)
    resolved = resolve(parsed)
    check_name(name)
    job = JobRef(name=name, namespace=namespace, uid="00000000-0000-4000-8000-000000000000")
    return build_desired_objects(job, parsed, resolved, OperatorSettings()).all()


PASSTHROUGH_PATHS = (
    "deviceResource",
    "image",
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "serviceAccountName",
    "hfTokenSecret",
    "output.path",
    "output.volumeClaim",
)
