"""The status reporter against a stand-in API server, reached through a KUBECONFIG."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import StandInApi

from finetune_trainer.progress import StatusPatcher

pytest.importorskip("kubernetes")


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInApi]:
    server = StandInApi(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    server.close()


def test_progress_merge_patches_the_status_subresource(api: StandInApi) -> None:
    patcher = StatusPatcher("tiny", "team-a", interval=0.05)
    patcher.report({"progress": {"step": 3, "maxSteps": 20, "summary": "3/20", "loss": 4.2}})
    patcher.report({"checkpoint": {"latest": "/output/checkpoint-2", "step": 2}})
    patcher.close()
    assert api.calls, "no PATCH reached the API server"
    call = api.calls[-1]
    assert call["path"] == "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status"
    assert call["type"] == "application/merge-patch+json"
    merged: dict[str, Any] = {}
    for c in api.calls:
        merged.update(c["body"]["status"])
    assert merged["progress"]["summary"] == "3/20"
    assert merged["checkpoint"]["step"] == 2


def test_api_errors_do_not_raise(api: StandInApi) -> None:
    api.status_code = 500
    try:
        patcher = StatusPatcher("tiny", "team-a", interval=0.05)
        patcher.report({"progress": {"step": 1}})
        patcher.close()  # logs a warning, raises nothing
        assert api.calls
    finally:
        api.status_code = 200
