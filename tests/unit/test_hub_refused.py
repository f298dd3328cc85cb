"""A hub refusal reported by the trainer: a condition and an Event, no restart loop."""

from __future__ import annotations

from reconcile_helpers import inputs, job, pod, spec

from finetune_operator.objects import config_hash
from finetune_operator.reconcile import plan
from finetune_operator.resolve import parse_spec, resolve

SPEC = spec(device="xpu", training={"globalBatchSize": 8, "microBatchSize": 2})
REFUSAL = (
    "model meta-llama/Llama-2-7b-hf is gated and the token in secret hf-token has no access: "
    "accept its terms on the hub with the token's account"
)


def _refused(hash_of: object) -> dict[str, object]:
    return {
        "phase": "Running",
        "ranks": {
            "worldSize": 2,
            "workers": 2,
            "summary": "2 workers x 1 card = 2 ranks",
            "configHash": hash_of,
            "reason": "HubRefused",
            "message": REFUSAL,
            "gradientAccumulationSteps": None,
        },
    }


def test_a_hub_refusal_is_valid_false_with_a_warning_and_no_restart() -> None:
    status = _refused(config_hash(resolve(parse_spec(SPEC))))
    failed = (pod(0, "Failed", False, exit_code=2), pod(1, "Failed", False, exit_code=2))

    result = plan(inputs(SPEC, status, job(failed=True), failed))

    valid = next(c for c in result.status["conditions"] if c["type"] == "Valid")
    assert (valid["status"], valid["reason"]) == ("False", "HubRefused")
    assert REFUSAL in valid["message"]
    assert ("Warning", "HubRefused") in [(e.type, e.reason) for e in result.events]
    assert result.delete_job is None and result.status["restarts"] == 0
    assert result.status["phase"] == "Pending"


def test_a_refusal_about_an_older_spec_is_ignored() -> None:
    status = _refused("0123456789abcdef")  # reported for a spec since edited
    running = (pod(0), pod(1))

    result = plan(inputs(SPEC, status, job(), running))

    valid = next(c for c in result.status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "True"
    assert result.status["phase"] == "Running"
