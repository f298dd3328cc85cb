"""Generated FinetuneJobs through the running operator: it never crashes or loops on them.

The specs come from spec_fuzz_helpers.py's generator (test_spec_fuzz.py's too). Each one the API server admits is created
for real in a namespace that one operator watches; then:

- the core rejects it -> the operator reports Valid=False with the core's message, and
  creates no worker Job;
- the core accepts it and the API server accepts every rendered object -> the worker Job
  exists and Valid=True;

and after all of them: the operator is still the process it started as (no crash), it logged
no failed reconcile, and no FinetuneJob's resourceVersion moves over two resync periods (no
status written in a loop).

Size: FTO_OPERATOR_FUZZ_EXAMPLES (default 20) examples.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import pytest
from fault_fixtures import api_error_message, dry_run_create
from hypothesis import HealthCheck, event, given, note, settings
from local_cluster import wait_for
from operator_fixtures import (
    Ftj,
    OperatorProcess,
)
from spec_fuzz_helpers import BASE, PASSTHROUGH_PATHS, generated_jobs, manifest, render

from finetune_operator.resolve import SpecError

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FTO_OPERATOR_FUZZ_EXAMPLES", "20"))
RESYNC = 5  # operator_fixtures runs the operator with --resync-seconds 5


def create(ftj: Ftj, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Creates the FinetuneJob for real; None when the API server rejects it."""
    from kubernetes.client.exceptions import ApiException

    body = manifest(name, spec)
    body["metadata"]["namespace"] = ftj.namespace
    try:
        return dry_run_create(ftj.custom_api.api_client, ftj.namespace, body, dry_run=False)
    except ApiException as error:
        if error.status in (400, 422):
            return None
        raise AssertionError(api_error_message(error)) from error


def test_operator_never_crashes_or_loops_on_generated_specs(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    from kubernetes.client.exceptions import ApiException

    pid = operator.process.pid if operator.process else None
    counter = iter(range(10**6))
    created: list[str] = []
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(job=generated_jobs())
    def property_(job: tuple[str, dict[str, Any], list[str]]) -> None:
        _, spec, kinds = job
        name = f"fuzz-{next(counter)}"
        note(json.dumps({"name": name, "spec": spec, "mutations": kinds}, default=str))
        stored = create(ftj, name, spec)
        if stored is None:
            event("rejected at apply")
            outcomes["rejected at apply"] += 1
            return
        created.append(name)
        try:
            objects = render(name, ftj.namespace, stored.get("spec") or {})
            core_error: SpecError | None = None
        except SpecError as error:
            core_error, objects = error, []
        rejected = []
        for obj in objects:
            try:
                dry_run_create(ftj.custom_api.api_client, ftj.namespace, obj)
            except ApiException as error:
                rejected.append(api_error_message(error))

        if core_error is not None:
            event("Valid=False expected")
            outcomes["Valid=False expected"] += 1
            valid = ftj.wait_condition(name, "Valid", status="False")
            assert str(core_error) in valid.get("message", ""), valid
            assert not ftj.jobs(name), "a worker Job was created for an invalid spec"
        elif rejected:
            # A pass-through field the API server checks only on the child that carries it:
            # the operator reports it (Created=False, ObjectRejected) and creates no worker Job.
            kinds_paths = [k.split(":", 1)[1] for k in kinds]
            assert any(p.startswith(PASSTHROUGH_PATHS) for p in kinds_paths), rejected
            event("ObjectRejected expected")
            outcomes["ObjectRejected expected"] += 1
            ftj.wait_condition(name, "Created", status="False", reason="ObjectRejected")
            assert not ftj.jobs(name), "a worker Job was created for a refused spec"
        else:
            event("worker Job expected")
            outcomes["worker Job expected"] += 1
            wait_for(lambda: ftj.jobs(name), timeout=60, description=f"{name}'s worker Job")
            assert ftj.condition(name, "Valid").get("status") == "True"

    property_()
    print(f"outcomes: {dict(outcomes)}")
    assert outcomes["worker Job expected"], outcomes

    # No crash: the same process, still running.
    assert operator.process is not None and operator.process.poll() is None, operator.logs()[-5000:]
    assert operator.process.pid == pid and operator.starts == 1
    # No loop: nothing is written to any FinetuneJob over two resync periods...
    versions = {name: ftj.get(name)["metadata"]["resourceVersion"] for name in created}
    time.sleep(2 * RESYNC + 1)
    moved = {
        name: version
        for name, version in versions.items()
        if ftj.get(name)["metadata"]["resourceVersion"] != version
        # running jobs legitimately change while their pods start
        and (ftj.status(name).get("phase") not in ("Running", "Pending"))
    }
    assert not moved, f"FinetuneJobs still being written: {sorted(moved)}"
    # ... and no reconcile failed.
    failures = [line for line in operator.logs().splitlines() if "failed; retrying" in line]
    assert not failures, "\n".join(failures[:10])


def test_operator_reports_objects_the_api_server_rejects(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    spec = {**BASE, "nodeSelector": {"k": "bad value!"}}
    assert create(ftj, "rejected-child", spec) is not None

    def reported() -> dict[str, Any] | None:
        body = ftj.get("rejected-child")
        for item in (body.get("status") or {}).get("conditions") or []:
            if item.get("status") == "False" and "bad value!" in (item.get("message") or ""):
                return item
        return None

    wait_for(reported, timeout=15, description="a condition carrying the API server's message")


def test_operator_reports_a_child_the_api_server_rejects(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    """A passed-through field only the API server checks (a priorityClassName that is not a
    DNS name): Created=False with its message and a Warning Event, once, not a silent loop;
    fixing the spec (a new generation) creates the worker Job."""
    spec = {**BASE, "priorityClassName": "Not_A_Name"}
    assert create(ftj, "rejected-pc", spec) is not None

    found = ftj.wait_condition("rejected-pc", "Created", timeout=30, reason="ObjectRejected")
    assert found["status"] == "False" and "Not_A_Name" in found["message"]
    version = ftj.get("rejected-pc")["metadata"]["resourceVersion"]
    time.sleep(8)  # several reconcile triggers later, nothing was rewritten
    assert ftj.get("rejected-pc")["metadata"]["resourceVersion"] == version
    assert ftj.event_reasons("rejected-pc").count("ObjectRejected") == 1

    ftj.patch_spec("rejected-pc", {"priorityClassName": None})
    wait_for(lambda: ftj.jobs("rejected-pc"), timeout=30, description="the worker Job")


def test_resources_that_are_not_maps_are_rejected_at_apply(ftj: Ftj) -> None:
    assert create(ftj, "bad-resources", {**BASE, "resources": {"limits": 1}}) is None


@pytest.mark.parametrize("validation_size", [2.5, 100.5])
def test_operator_reports_what_only_the_core_rejects(
    ftj: Ftj, operator: OperatorProcess, validation_size: float
) -> None:
    """What the CRD cannot express (a fractional row count) passes apply; the operator says
    Valid=False with the core's message and creates no worker Job."""
    spec = {**BASE, "dataset": {"name": "d", "validationSize": validation_size}}
    assert create(ftj, "core-only", spec) is not None
    with pytest.raises(SpecError) as expected:
        render("core-only", ftj.namespace, spec)

    valid = ftj.wait_condition("core-only", "Valid", status="False")
    assert str(expected.value) in valid["message"], valid
    time.sleep(2)
    assert not ftj.jobs("core-only")
