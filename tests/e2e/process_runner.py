"""A stand-in kubelet for the local control plane: runs worker pods' containers as local processes.

`python tests/e2e/process_runner.py --namespace NS` (with the project's Python) watches
the pods in NS that carry `finetune.dev/job-name` and the simulation label the local cluster
leaves to manual control (`finetune.dev/simulate=manual`, see hack/README.md), once the
scheduler has bound them to a node. For each it does what a kubelet does, on this machine:

- the container's command and args, with its env exactly as the pod spec writes it: values,
  `valueFrom` fieldRef / secretKeyRef / configMapKeyRef read from the API, `$(VAR)` expanded
  as the kubelet expands it (`$$` escapes);
- volumes: configMap and secret volumes are written to a folder per pod, emptyDir gets a folder
  per pod (except /tmp and /dev/shm, which the host has), a persistentVolumeClaim a folder per
  claim shared by every pod (ReadWriteMany); each mount path is mapped to its folder in the
  args, the env values and the configMap files (config.json names the output path);
- networking: the rendezvous host (`<pod-hostname>.<subdomain>`, rank 0 behind the headless
  Service) is mapped to 127.0.0.1, and the rendezvous port to a free port per worker Job, so
  jobs never collide;
- status: Running (container ready) once started, then Succeeded or Failed with the exit code,
  the reason and the tail of the log as the message, through the pods/status subresource. A pod
  that is deleted has its process group killed.

The base environment is PATH (the runner's Python first), LANG, HOSTNAME (the pod's hostname)
and KUBECONFIG (so the trainer's status reports reach the API server as they would in a pod);
then the pod's env. Test-only, and so outside the shipped package: the e2e tests
(test_operator_runner.py) and hack/demo run it.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune_operator.controller.kube import Kube, KubeError
from finetune_operator.objects import JOB_NAME_LABEL

log = logging.getLogger("process_runner")

Obj = dict[str, Any]

SIMULATE_SELECTOR = "finetune.dev/simulate=manual"
HOST_PATHS = ("/tmp", "/dev/shm")
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names are replaced, `$$` is a literal `$`,
    anything else stays as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR.sub(one, text)


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API fieldRef."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    match = _FIELD.match(path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ValueError(f"fieldRef {path} is not supported by the local runner")


def map_paths(text: str, mounts: Sequence[tuple[str, str]]) -> str:
    """Replace mount paths (longest first) where they start a path in `text`."""
    for mount, local in sorted(mounts, key=lambda m: -len(m[0])):
        pattern = r"(?<![\w./-])" + re.escape(mount.rstrip("/")) + r"(?=/|$|[\s\"',:;=])"
        text = re.sub(pattern, local.replace("\\", "\\\\"), text)
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Running:
    pod: Obj
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path


@dataclass
class Runner:
    kube: Kube
    namespace: str
    workdir: Path
    selector: str = f"{JOB_NAME_LABEL},{SIMULATE_SELECTOR}"
    kubeconfig: str | None = None
    running: dict[str, Running] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    ports: dict[str, int] = field(default_factory=dict)

    # -- what a pod becomes -------------------------------------------------------------------
    def _get(self, kind: str, name: str) -> Obj:
        obj = self.kube.get("v1", kind, self.namespace, name)
        if obj is None:
            raise RuntimeError(f"{kind} {self.namespace}/{name} not found")
        return obj

    def _key_ref(self, kind: str, ref: Mapping[str, Any]) -> str:
        obj = self._get(kind, ref["name"])
        if kind == "Secret":
            return base64.b64decode((obj.get("data") or {})[ref["key"]]).decode()
        return str((obj.get("data") or {})[ref["key"]])

    def _mounts(
        self, pod: Obj, container: Obj, poddir: Path
    ) -> tuple[list[tuple[str, str]], list[tuple[Path, str]]]:
        """Mount path -> local folder, and the files to write (path, text before mapping)."""
        volumes = {v["name"]: v for v in (pod["spec"].get("volumes") or [])}
        mounts: list[tuple[str, str]] = []
        files: list[tuple[Path, str]] = []
        for mount in container.get("volumeMounts") or []:
            path = mount["mountPath"]
            volume = volumes.get(mount["name"], {})
            if "emptyDir" in volume and path in HOST_PATHS:
                continue
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                local = self.workdir / "claims" / self.namespace / claim
            else:
                local = poddir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mounts.append((path, str(local)))
            if "configMap" in volume:
                data = self._get("ConfigMap", volume["configMap"]["name"]).get("data") or {}
                files += [(local / key, value) for key, value in data.items()]
            elif "secret" in volume:
                data = self._get("Secret", volume["secret"]["secretName"]).get("data") or {}
                files += [(local / k, base64.b64decode(v).decode()) for k, v in data.items()]
        return mounts, files

    def _rendezvous(self, pod: Obj, container: Obj) -> tuple[str | None, int | None, int]:
        """(host suffix to map to the loopback, pod's rendezvous port, local port)."""
        subdomain = pod["spec"].get("subdomain")
        port = next(
            (
                p["containerPort"]
                for p in container.get("ports") or []
                if p.get("name") == "rendezvous"
            ),
            None,
        )
        owner = next(
            (
                r["uid"]
                for r in pod["metadata"].get("ownerReferences") or []
                if r.get("kind") == "Job"
            ),
            pod["metadata"]["uid"],
        )
        local = self.ports.setdefault(owner, free_port())
        return subdomain, port, local

    def prepare(self, pod: Obj) -> tuple[list[str], dict[str, str], Path]:
        """The command line and environment the pod's (first) container runs with."""
        container = pod["spec"]["containers"][0]
        poddir = self.workdir / "pods" / pod["metadata"]["uid"]
        poddir.mkdir(parents=True, exist_ok=True)
        mounts, files = self._mounts(pod, container, poddir)
        subdomain, pod_port, local_port = self._rendezvous(pod, container)

        def localize(text: str) -> str:
            text = map_paths(text, mounts)
            if subdomain:
                text = re.sub(
                    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\." + re.escape(subdomain) + r"(\.[a-z0-9.-]+)?",
                    "127.0.0.1",
                    text,
                )
            if pod_port is not None:
                text = re.sub(rf"(--master[-_]port[= ]){pod_port}\b", rf"\g<1>{local_port}", text)
            return text

        for path, text in files:
            path.write_text(localize(text))

        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                value = expand(str(item["value"]), env)
            else:
                source = item.get("valueFrom") or {}
                if "fieldRef" in source:
                    value = field_value(pod, source["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in source:
                    value = self._key_ref("Secret", source["secretKeyRef"])
                elif "configMapKeyRef" in source:
                    value = self._key_ref("ConfigMap", source["configMapKeyRef"])
                else:
                    raise ValueError(f"env {item['name']}: unsupported valueFrom {sorted(source)}")
            env[item["name"]] = value
        env = {name: localize(value) for name, value in env.items()}

        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        argv = [localize(expand(arg, env)) for arg in argv]
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        base = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": hostname,
        }
        kubeconfig = self.kubeconfig or os.environ.get("KUBECONFIG")
        if kubeconfig:
            base["KUBECONFIG"] = kubeconfig
        workdir = Path(map_paths(container.get("workingDir") or str(poddir), mounts))
        return argv, {**base, **env}, workdir

    # -- kubelet duties ----------------------------------------------------------------------
    def report(self, pod: Obj, phase: str, exit_code: int | None = None, message: str = "") -> None:
        now = _now()
        container = pod["spec"]["containers"][0]
        if phase == "Running":
            state: Obj = {"running": {"startedAt": now}}
        else:
            state = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    "message": message[-4000:],
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        ready = "True" if phase == "Running" else "False"
        status: Obj = {
            "phase": phase,
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": phase == "Running",
                    "started": phase == "Running",
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
        if phase == "Running":
            status["startTime"] = now
        metadata = pod["metadata"]
        try:
            self.kube.request(
                "PATCH",
                f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}/status",
                body={"status": status},
                content_type="application/merge-patch+json",
                allow_missing=True,
            )
        except KubeError as error:
            log.warning("status of pod %s: %s", metadata["name"], error)

    def start(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        name = pod["metadata"]["name"]
        try:
            argv, env, cwd = self.prepare(pod)
        except Exception as error:
            log.error("pod %s cannot run: %s", name, error)
            self.finished.add(uid)
            self.report(pod, "Failed", 128, f"local runner: {error}")
            return
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "pods" / uid / "container.log"
        log.info("pod %s: %s", name, " ".join(argv))
        with log_path.open("wb") as out:
            try:
                process = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                self.finished.add(uid)
                self.report(pod, "Failed", 127, f"local runner: {error}")
                return
        self.running[uid] = Running(pod=pod, process=process, log_path=log_path, workdir=cwd)
        self.report(pod, "Running")

    def stop(self, uid: str, reason: str) -> None:
        entry = self.running.pop(uid, None)
        if entry is None:
            return
        log.info("pod %s %s: stopping its processes", entry.pod["metadata"]["name"], reason)
        _kill_group(entry.process)
        self.finished.add(uid)

    def step(self) -> None:
        pods = self.kube.list("v1", "Pod", self.namespace, self.selector)
        live = {p["metadata"]["uid"]: p for p in pods}
        for uid in list(self.running):
            pod = live.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                self.stop(uid, "was deleted")
        for uid, entry in list(self.running.items()):
            code = entry.process.poll()
            if code is None:
                continue
            del self.running[uid]
            self.finished.add(uid)
            tail = _tail(entry.log_path)
            log.info("pod %s exited %s", entry.pod["metadata"]["name"], code)
            self.report(
                entry.pod, "Succeeded" if code == 0 else "Failed", code, "" if code == 0 else tail
            )
        for uid, pod in live.items():
            if uid in self.running or uid in self.finished:
                continue
            if pod["metadata"].get("deletionTimestamp") or not pod["spec"].get("nodeName"):
                continue
            if (pod.get("status") or {}).get("phase", "Pending") != "Pending":
                continue
            self.start(pod)

    def shutdown(self) -> None:
        for uid in list(self.running):
            self.stop(uid, "runner stopping")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="process_runner.py", description=__doc__)
    parser.add_argument("--namespace", "-n", required=True)
    parser.add_argument("--selector", default=f"{JOB_NAME_LABEL},{SIMULATE_SELECTOR}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/finetune-runner"))
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--keep", action="store_true", help="keep the work folder at exit")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner %(levelname)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(
        kube=Kube.from_environment(),
        namespace=args.namespace,
        workdir=args.workdir,
        selector=args.selector,
    )
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            try:
                runner.step()
            except Exception as error:  # the API server may be busy: try again
                log.warning("runner step failed: %s", error)
            time.sleep(args.interval)
    finally:
        runner.shutdown()
        if not args.keep:
            shutil.rmtree(args.workdir / "pods", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
