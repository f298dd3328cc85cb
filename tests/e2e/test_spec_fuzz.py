"""Property-based bad input: generated FinetuneJobs, valid and invalid, against the real API server.

Every generated manifest ends in exactly one of three ways:

1. rejected by the API server at apply (schema, CEL): the message names the field;
2. accepted by the API server but rejected by the core (``parse_spec``/``resolve`` raising
   SpecError, which the operator reports as Valid=False): the message names the field;
3. accepted by both, and then every object ``build_desired_objects`` renders is accepted by
   the API server (server-side dry run in a test namespace).

So "the core accepts it" never leads to an object the API server refuses, and the CEL rules
are never stricter than the Python rules: a spec that the core resolves is never rejected at
apply (checked on well-typed specs; pydantic's lax coercions such as "4" -> 4 are the API
server's to reject, and are).

The core is run on the object the API server returns (what the operator would read), not
on the generated dict.

Sizes: FTO_FUZZ_EXAMPLES (default 60) examples per property; deadline off (the API server
answers on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
from fault_fixtures import api_error_message, dry_run_create
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from finetune_operator.api import API_VERSION, KIND, MAX_NAME_LENGTH
from finetune_operator.objects import JobRef, build_desired_objects
from finetune_operator.resolve import SpecError, check_name, parse_spec, resolve
from finetune_operator.settings import OperatorSettings

EXAMPLES = int(os.environ.get("FTO_FUZZ_EXAMPLES", "60"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

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


# ------------------------------------------------------------------------------------------
# Checks


def assert_clear_server_message(message: str) -> None:
    # The API server names the object and the offending field (spec.X, metadata.name).
    assert "FinetuneJob" in message, message
    assert re.search(r"\b(spec|metadata\.name|<nil>)", message), message


def assert_clear_core_message(error: SpecError) -> None:
    text = str(error)
    assert len(text) > 20, text
    # Names the field it is about: spec.x.y, or a camelCase field of the API.
    assert re.search(
        r"spec\.|training\.|dataset\.|quantization|world size|workers|globalBatchSize|name",
        text,
    ), text


def render(name: str, namespace: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    parsed = parse_spec(spec)
    resolved = resolve(parsed)
    check_name(name)
    job = JobRef(name=name, namespace=namespace, uid="00000000-0000-4000-8000-000000000000")
    return build_desired_objects(job, parsed, resolved, OperatorSettings())


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


def known_bug(name: str, spec: dict[str, Any]) -> str | None:
    """Counterexamples of bugs already reported and not yet fixed: the property skips them so
    that it keeps finding new ones. None open now (each fixed one has a regression test below)."""
    return None


def classify(kube_api: Any, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Where this manifest ends: {'outcome': 'server'|'core'|'rendered', ...}."""
    from kubernetes.client.exceptions import ApiException

    # What the core makes of the raw dict, before the API server has seen it. Anything but
    # SpecError is a crash: the operator would retry it forever.
    try:
        render(name, namespace, spec)
        core_on_raw: str | None = None
    except SpecError as error:
        core_on_raw = str(error)

    try:
        stored = dry_run_create(kube_api, namespace, manifest(name, spec))
    except ApiException as error:
        if error.status not in (400, 422):
            raise
        return {
            "outcome": "server",
            "message": api_error_message(error),
            "core_on_raw": core_on_raw,
        }

    try:
        objects = render(name, namespace, stored.get("spec") or {})
    except SpecError as error:
        return {"outcome": "core", "error": error, "message": str(error)}
    rejected = []
    for obj in objects:
        try:
            dry_run_create(kube_api, namespace, obj)
        except ApiException as error:
            rejected.append(f"{obj['kind']} {obj['metadata']['name']}: {api_error_message(error)}")
    return {"outcome": "rendered", "rejected": rejected, "objects": objects}


@pytest.fixture(scope="module")
def fuzz_namespace(core_api: Any, finetunejob_crd: None) -> Any:
    from kubernetes import client
    from local_cluster import unique_name

    name = unique_name("e2e-spec-fuzz")
    core_api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core_api.delete_namespace(name)


OUTCOMES: dict[str, int] = {}


@FUZZ_SETTINGS
@given(job=generated_jobs())
def test_generated_spec_is_rejected_clearly_or_renders_into_accepted_objects(
    kube_api: Any, fuzz_namespace: str, job: tuple[str, dict[str, Any], list[str]]
) -> None:
    name, spec, kinds = job
    note(json.dumps({"name": name, "spec": spec, "mutations": kinds}, indent=1, default=str))
    bug = known_bug(name, spec)
    if bug:
        event(f"known bug: {bug}")
        return
    result = classify(kube_api, fuzz_namespace, name, spec)
    OUTCOMES[result["outcome"]] = OUTCOMES.get(result["outcome"], 0) + 1
    event(f"outcome: {result['outcome']}")
    note(f"outcome: {result['outcome']}: {result.get('message') or result.get('rejected')}")

    if result["outcome"] == "server":
        assert_clear_server_message(result["message"])
        # CEL/schema never stricter than Python: a well-typed spec the core resolves (with a
        # name the CRD allows) must not be rejected at apply.
        well_typed = not any(kind.startswith("type:") for kind in kinds)
        if result["core_on_raw"] is None and well_typed and len(name) <= MAX_NAME_LENGTH:
            pytest.fail(
                "the core resolves this spec but the API server rejects it at apply:\n"
                + result["message"]
            )
    elif result["outcome"] == "core":
        assert_clear_core_message(result["error"])
    elif result["rejected"]:
        # Fields passed through to the pods (nodeSelector, tolerations, secret names ...) are
        # checked by the API server only when the Job is created: the operator must then say
        # so in status (test_spec_fuzz_operator.py checks it does). Anything else is a bug.
        passthrough = [k for k in kinds if k.split(":", 1)[1].startswith(PASSTHROUGH_PATHS)]
        if passthrough:
            event("rendered object rejected: pass-through field")
            return
        pytest.fail(
            "the core accepted the spec but the API server rejects what it renders:\n"
            + "\n".join(result["rejected"])
        )


def test_outcomes_reach_server_and_rendered() -> None:
    """Runs after the property (file order): the generator reached both main outcomes, so
    neither check above is vacuous."""
    if not OUTCOMES:
        pytest.skip("the property did not run in this session")
    assert {"server", "rendered"} <= set(OUTCOMES), OUTCOMES


BASE = {"model": {"name": "meta-llama/Llama-2-7b-hf"}, "dataset": {"name": "yahma/alpaca-cleaned"}}


@pytest.mark.parametrize(
    "spec",
    [
        {**BASE, "dataset": {"name": "d", "validationSize": 2.5}},
        {**BASE, "dataset": {"name": "d", "validationSize": 100.5}},
    ],
    ids=["validation-size-2.5", "validation-size-100.5"],
)
def test_accepted_at_apply_rejected_by_the_core_with_a_clear_message(
    kube_api: Any, fuzz_namespace: str, spec: dict[str, Any]
) -> None:
    """What the CRD cannot express: the operator must report Valid=False with this message."""
    result = classify(kube_api, fuzz_namespace, "core-only", spec)
    assert result["outcome"] == "core", result
    assert_clear_core_message(result["error"])


# Regression tests for bugs the property above found (names the Service cannot take, the core
# more lenient than CEL, resources that are not maps), all fixed in the core.


@pytest.mark.parametrize("name", ["a.b", "1job"])
def test_names_the_crd_admits_render_into_accepted_objects(
    kube_api: Any, fuzz_namespace: str, name: str
) -> None:
    result = classify(kube_api, fuzz_namespace, name, BASE)
    assert result["outcome"] != "rendered" or not result["rejected"], result["rejected"]


@pytest.mark.parametrize(
    "spec",
    [
        {**BASE, "device": "cpu", "deviceResource": "gpu.intel.com/i915"},
        {**BASE, "training": {"microBatchSize": 0}},
        {**BASE, "training": {"microBatchSize": -1}},
    ],
    ids=["cpu-with-device-resource", "micro-batch-0", "micro-batch-minus-1"],
)
def test_core_is_never_more_lenient_than_cel(
    kube_api: Any, fuzz_namespace: str, spec: dict[str, Any]
) -> None:
    result = classify(kube_api, fuzz_namespace, "lenient", spec)
    assert result["outcome"] == "server"
    with pytest.raises(SpecError):
        render("lenient", fuzz_namespace, spec)


def test_resources_that_are_not_maps_are_a_spec_error(kube_api: Any, fuzz_namespace: str) -> None:
    spec = {**BASE, "resources": {"limits": 1}}
    result = classify(kube_api, fuzz_namespace, "resources", spec)
    assert result["outcome"] == "server", result
    with pytest.raises(SpecError):
        render("resources", fuzz_namespace, spec)
