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
from collections import Counter
from typing import Any

import pytest
from fault_fixtures import api_error_message, dry_run_create
from hypothesis import HealthCheck, event, given, note, settings
from spec_fuzz_helpers import BASE, PASSTHROUGH_PATHS, generated_jobs, manifest, render

from finetune_operator.api import MAX_NAME_LENGTH
from finetune_operator.resolve import SpecError

EXAMPLES = int(os.environ.get("FTO_FUZZ_EXAMPLES", "60"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

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


def check_outcome(result: dict[str, Any], name: str, kinds: list[str]) -> None:
    """The property, for one generated manifest classified by :func:`classify`."""
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


def test_generated_spec_is_rejected_clearly_or_renders_into_accepted_objects(
    kube_api: Any, fuzz_namespace: str
) -> None:
    outcomes: Counter[str] = Counter()

    @FUZZ_SETTINGS
    @given(job=generated_jobs())
    def property_(job: tuple[str, dict[str, Any], list[str]]) -> None:
        name, spec, kinds = job
        note(json.dumps({"name": name, "spec": spec, "mutations": kinds}, indent=1, default=str))
        result = classify(kube_api, fuzz_namespace, name, spec)
        outcomes[result["outcome"]] += 1
        event(f"outcome: {result['outcome']}")
        note(f"outcome: {result['outcome']}: {result.get('message') or result.get('rejected')}")
        check_outcome(result, name, kinds)

    property_()
    # The generator reached both main outcomes, so neither check above is vacuous.
    assert {"server", "rendered"} <= set(outcomes), outcomes


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


# Cases the property above must keep covering: names the Service cannot take, specs the core
# must refuse as CEL does, resources that are not maps.


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
