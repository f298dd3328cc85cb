"""Progress from rank 0: JSON lines (file + stdout) and, in a cluster, the FinetuneJob's status.

The status PATCH runs in a background thread that sends only the newest report, at most
every `interval` seconds; any failure there is logged and dropped, so training never
fails or waits because the API server is slow or unreachable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback as TfProgressCallback

from finetune_operator.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"
# status.progress fields of the CRD (finetune_operator.api); the JSON lines carry gradNorm too.
STATUS_FIELDS = ("step", "maxSteps", "epoch", "loss", "evalLoss", "learningRate", "tokensPerSecond")
_SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _for_status(value: Any) -> Any:
    """Four significant digits: enough to watch a loss move, short in a printer column."""
    if isinstance(value, float) and value != 0:
        return float(f"{value:.4g}")
    return value


class StatusPatcher:
    """Merge-patches status of one FinetuneJob from a background thread, newest report wins."""

    def __init__(
        self,
        name: str,
        namespace: str,
        interval: float = 5.0,
        send: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.name, self.namespace, self.interval = name, namespace, interval
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._send = send or self._client()
        self._thread = threading.Thread(target=self._loop, name="status-patcher", daemon=True)
        self._thread.start()

    def _path(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}/status"

    def _client(self) -> Any:
        """A callable(body) that PATCHes: service-account token in a pod, else KUBECONFIG."""
        token_file = _SA / "token"
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if host and token_file.exists():
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            context = ssl.create_default_context(cafile=str(_SA / "ca.crt"))
            url = f"https://{host}:{port}{self._path()}"

            def send_incluster(body: dict[str, Any]) -> None:
                request = urllib.request.Request(
                    url,
                    data=json.dumps(body).encode(),
                    method="PATCH",
                    headers={
                        # Re-read: projected tokens rotate.
                        "Authorization": f"Bearer {token_file.read_text().strip()}",
                        "Content-Type": "application/merge-patch+json",
                    },
                )
                with urllib.request.urlopen(request, timeout=10, context=context):
                    pass

            return send_incluster
        try:
            from kubernetes import client, config
        except ImportError:
            log.warning("no service-account token and no kubernetes package: status not reported")
            return None
        try:  # KUBECONFIG read now: the kubernetes package reads it once, at import
            api_client = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG")
            )
        except Exception as error:
            log.warning("no usable KUBECONFIG (%s): status not reported", error)
            return None
        api = client.CustomObjectsApi(api_client)

        def send_kubeconfig(body: dict[str, Any]) -> None:
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body, _request_timeout=10
            )

        return send_kubeconfig

    def report(self, status: dict[str, Any]) -> None:
        with self._lock:
            # Merge field by field: an eval report (no loss) must not drop the last step's loss
            # from a patch that has not been sent yet.
            for key, value in status.items():
                previous = self._pending.get(key)
                if isinstance(value, dict) and isinstance(previous, dict):
                    self._pending[key] = {**previous, **value}
                else:
                    self._pending[key] = value
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            self._flush()
            time.sleep(self.interval)  # rate limit; newer reports accumulate meanwhile

    def _flush(self) -> None:
        with self._lock:
            body, self._pending = self._pending, {}
        if not body or self._send is None:
            return
        try:
            self._send({"status": body})
        except Exception as error:  # never let reporting break training
            log.warning("status patch of %s/%s failed: %s", self.namespace, self.name, error)

    def close(self) -> None:
        """Send what is pending now (the last report), without waiting for the interval."""
        self._stopped = True
        self._flush()


def _peak_device_memory() -> int | None:
    """The most this rank's CUDA/XPU device has held in tensors so far (torch's allocator
    counter, as max_memory_allocated); None on the CPU."""
    import torch

    for kind in ("cuda", "xpu"):
        accel = getattr(torch, kind, None)
        if accel is not None and accel.is_available() and accel.is_initialized():
            return int(accel.max_memory_allocated())
    return None


class ProgressCallback(TrainerCallback):
    """Rank 0's reporter: one JSON line per log event, checkpoint notices to the status."""

    def __init__(self, output_dir: Path, patcher: StatusPatcher | None) -> None:
        self.path = output_dir / PROGRESS_FILE
        self.patcher = patcher
        self._last_time = time.monotonic()
        self._last_tokens = 0
        self._start: tuple[float, int] = (self._last_time, 0)  # (time, step) of train begin
        self.records: list[dict[str, Any]] = []
        # In a terminal the progress bar shows the steps (TerminalBar) and the JSON lines go
        # to the progress file only: printed there too they would be glued onto the bar.
        self.to_stdout = not sys.stdout.isatty()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen or 0
        self._start = (self._last_time, state.global_step)
        if state.is_world_process_zero and state.global_step:
            self._emit({"event": "resumed", "step": state.global_step, "maxSteps": state.max_steps})

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        elapsed = now - self._last_time
        rate = (tokens - self._last_tokens) / elapsed if elapsed > 0 and tokens else None
        self._last_time, self._last_tokens = now, tokens
        record = {
            "step": state.global_step,
            "maxSteps": state.max_steps,
            "epoch": _number(state.epoch),
            "loss": _number(logs.get("loss")),
            "evalLoss": _number(logs.get("eval_loss")),
            "learningRate": _number(logs.get("learning_rate")),
            "gradNorm": _number(logs.get("grad_norm")),
            "tokensPerSecond": None if "loss" not in logs else _number(rate),
            # non-padding input tokens so far, all ranks (perf.HostTokenCounter)
            "tokens": tokens or None,
            "etaSeconds": self._eta(now, state.global_step, state.max_steps),
            "peakMemoryBytes": _peak_device_memory(),
        }
        if "grad_norm" in logs and record["gradNorm"] is None:
            record["gradNormFinite"] = False
        self._emit({k: v for k, v in record.items() if v is not None})
        if self.patcher is not None:
            # Rounded for `kubectl get ftj`; progress.jsonl keeps full precision.
            progress = {
                k: _for_status(v) for k, v in record.items() if v is not None and k in STATUS_FIELDS
            }
            progress["summary"] = f"{state.global_step}/{state.max_steps}"
            progress["updatedAt"] = _now()
            self.patcher.report({"progress": progress})

    def _eta(self, now: float, step: int, max_steps: int) -> float | None:
        """Seconds left at the mean pace of the steps this process has run."""
        started, first = self._start
        if step <= first or not max_steps:
            return None
        return round((now - started) / (step - first) * max(max_steps - step, 0), 1)

    def on_checkpoint_complete(self, step: int, path: Path) -> None:
        self._emit({"event": "checkpoint", "step": step, "path": str(path)})
        if self.patcher is not None:
            self.patcher.report({"checkpoint": {"latest": str(path), "step": step}})

    def event(self, record: dict[str, Any]) -> None:
        """A one-off record (rank 0), e.g. what `microBatchSize: auto` chose."""
        self._emit(record)

    def _emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        line = json.dumps(record)
        with self.path.open("a") as file:
            file.write(line + "\n")
        if self.to_stdout:
            print(line, file=sys.stdout, flush=True)


class TerminalBar(TfProgressCallback):
    """transformers' progress bar with step, loss and tokens/s beside tqdm's ETA, and without
    its printed dict per log (the JSON lines carry those numbers)."""

    def __init__(self, progress: ProgressCallback) -> None:
        super().__init__()
        self.progress = progress
        self.shown: dict[str, str] = {}

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        bar = getattr(self, "training_bar", None)
        if not state.is_world_process_zero or bar is None or not self.progress.records:
            return
        last = self.progress.records[-1]
        for key, name in (("loss", "loss"), ("evalLoss", "eval"), ("tokensPerSecond", "tok/s")):
            if isinstance(last.get(key), float):  # the newest of each, kept across logs
                self.shown[name] = f"{last[key]:.4g}"
        bar.set_postfix(self.shown, refresh=True)


def use_terminal_bar(trainer: Any, progress: ProgressCallback) -> None:
    """Swap transformers' bar (when it shows one: rank 0 in a terminal) for TerminalBar."""
    if any(isinstance(c, TfProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(TfProgressCallback)
        trainer.add_callback(TerminalBar(progress))
