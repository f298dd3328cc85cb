"""The status reporter against a stand-in API server, reached through a KUBECONFIG."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from finetune_trainer.progress import StatusPatcher

pytest.importorskip("kubernetes")


class _Recorder(BaseHTTPRequestHandler):
    calls: ClassVar[list[dict[str, Any]]] = []
    status_code = 200

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append({"path": self.path, "type": self.headers["Content-Type"], "body": body})
        self.send_response(self.status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Recorder]]:
    _Recorder.calls = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield _Recorder
    server.shutdown()


def test_progress_merge_patches_the_status_subresource(api: type[_Recorder]) -> None:
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


def test_api_errors_do_not_raise(api: type[_Recorder]) -> None:
    api.status_code = 500
    try:
        patcher = StatusPatcher("tiny", "team-a", interval=0.05)
        patcher.report({"progress": {"step": 1}})
        patcher.close()  # logs a warning, raises nothing
        assert api.calls
    finally:
        api.status_code = 200
