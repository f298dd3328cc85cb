"""The operator at scale on the local control plane (hack/dev-cluster, kwok-simulated GPU nodes).

For each phase (default: 100, then 1,000 FinetuneJobs of 4 workers x 1 gpu.intel.com/i915),
creates the jobs at a steady rate in a fresh namespace and measures, per job:

- create -> children created: from the moment the API server answered the create of the
  FinetuneJob to the moment the last of its children (ServiceAccount, Role, RoleBinding,
  ConfigMap, Service, worker Job) was seen on a watch;
- create -> all pods bound: to the moment the 4th worker pod was seen with spec.nodeName;

and, for the operator process: peak RSS (VmHWM), RSS sampled every second (is it flat?),
CPU seconds (utime + stime from /proc), and API requests per job.

API requests are counted by wrapping the operator: it is started through this script
(``operator_scale.py --shim COUNTS -- run ...``), which counts every HTTP request the
operator's clients send (urllib3 for the kubernetes client, aiohttp for kopf) by verb and
resource before handing over to ``finetune_operator.cli.main``. kube-apiserver's
``apiserver_request_total`` has no client/user-agent label, so it cannot attribute requests
to the operator; its total delta (every client: controller-manager, scheduler, kwok, this
driver) is reported beside it for context.

Pods follow kwok's default lifecycle (Running once bound, then Succeeded), so GPUs free up and
every job reaches Succeeded; the FinetuneJobs left at the end of each phase are counted by
phase.

Usage (see benchmarks/README.md, "Operator at scale"):

    FTO_CLUSTER_NAME=fto-scale FTO_GPU_NODES=100 hack/dev-cluster up   # prints KUBECONFIG
    kubectl apply -f crds/
    .venv/bin/python benchmarks/operator_scale.py --jobs 100 1000 --rate 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
JOB_NAME_LABEL = "finetune.dev/job-name"
MANAGED_BY = "app.kubernetes.io/managed-by=finetune-operator"
CHILD_RESOURCES = {
    # kind: (API prefix, plural)
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
}


# ---------------------------------------------------------------------------------------------
# The shim: run the operator with its HTTP requests counted.


def run_shim(counts_path: str, operator_argv: list[str]) -> int:
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def classify(method: str, url: str) -> str:
        path = url.split("?", 1)[0]
        query = url.split("?", 1)[1] if "?" in url else ""
        parts = [p for p in path.split("/") if p]
        # /api/v1/namespaces/NS/pods/NAME/status -> pods/status
        resource = "?"
        if "namespaces" in parts:
            rest = parts[parts.index("namespaces") + 2 :]
            resource = "/".join([rest[0], *rest[2:3]]) if rest else "namespaces"
        elif len(parts) >= 3:
            resource = parts[-1] if parts[0] == "api" else parts[3] if len(parts) > 3 else parts[-1]
        verb = method.upper()
        if verb == "GET" and "watch=" in query and "watch=false" not in query:
            verb = "WATCH"
        return f"{verb} {resource}"

    def record(method: str, url: str) -> None:
        with lock:
            counts[classify(method, str(url))] += 1

    import urllib3.poolmanager

    original_urlopen = urllib3.poolmanager.PoolManager.urlopen

    def counting_urlopen(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        record(method, url)
        return original_urlopen(self, method, url, *args, **kwargs)

    urllib3.poolmanager.PoolManager.urlopen = counting_urlopen  # type: ignore[method-assign]

    with contextlib.suppress(ImportError):
        import aiohttp

        original_request = aiohttp.ClientSession._request

        async def counting_request(
            self: Any, method: str, url: Any, *args: Any, **kwargs: Any
        ) -> Any:
            params = kwargs.get("params")
            text = str(url)
            if params and "watch" in dict(params):
                text += "?watch=true"
            record(method, text)
            return await original_request(self, method, url, *args, **kwargs)

        aiohttp.ClientSession._request = counting_request  # type: ignore[method-assign]

    def dump() -> None:
        with lock:
            data = dict(counts)
        tmp = counts_path + ".tmp"
        Path(tmp).write_text(json.dumps(data))
        os.replace(tmp, counts_path)

    def dumper() -> None:
        while True:
            time.sleep(0.5)
            dump()

    threading.Thread(target=dumper, daemon=True, name="request-counts").start()

    if os.environ.get("FTO_TRACEMALLOC"):
        # Where the operator's memory goes: top allocation sites, every 20 s.
        import tracemalloc

        tracemalloc.start(int(os.environ["FTO_TRACEMALLOC"]))

        def snapshots() -> None:
            while True:
                time.sleep(20)
                snapshot = tracemalloc.take_snapshot()
                total = sum(stat.size for stat in snapshot.statistics("filename"))
                lines = [f"traced total {total / 2**20:.1f} MiB"]
                for stat in snapshot.statistics("traceback")[:8]:
                    lines.append(f"{stat.size / 2**20:8.1f} MiB {stat.count:8d} blocks")
                    lines += [f"    {frame}" for frame in stat.traceback.format()]
                Path(counts_path + ".mem").write_text("\n".join(lines) + "\n")

        threading.Thread(target=snapshots, daemon=True, name="tracemalloc").start()
    import atexit

    atexit.register(dump)
    from finetune_operator.cli import main

    return main(operator_argv)


# ---------------------------------------------------------------------------------------------
# Watching the cluster with raw HTTP (cheap: json.loads only, no model deserialisation).


class RawWatch(threading.Thread):
    def __init__(self, api: Any, path: str, selector: str, on_event: Any) -> None:
        super().__init__(daemon=True, name=f"watch {path}")
        self.api, self.path, self.selector, self.on_event = api, path, selector, on_event
        self.stopping = threading.Event()

    def run(self) -> None:
        from urllib.parse import quote

        host = self.api.configuration.host
        resource_version = ""
        while not self.stopping.is_set():
            url = (
                f"{host}{self.path}?watch=1&allowWatchBookmarks=false&timeoutSeconds=60"
                f"&labelSelector={quote(self.selector)}"
            )
            if resource_version:
                url += f"&resourceVersion={resource_version}"
            try:
                response = self.api.rest_client.pool_manager.request(
                    "GET", url, preload_content=False, timeout=urllib3_timeout()
                )
                buffer = b""
                for chunk in response.stream(65536):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            resource_version = ""  # expired: relist from now
                            continue
                        resource_version = obj.get("metadata", {}).get("resourceVersion", "")
                        self.on_event(event["type"], obj, time.time())
                    if self.stopping.is_set():
                        break
                response.release_conn()
            except Exception as error:  # reconnect: the apiserver may be busy
                print(f"watch {self.path}: {error!r}; reconnecting", file=sys.stderr)
                time.sleep(0.5)


def urllib3_timeout() -> Any:
    import urllib3

    return urllib3.Timeout(connect=10, read=90)


@dataclass
class JobTimes:
    created: float
    children: dict[str, float] = field(default_factory=dict)  # kind -> first seen
    bound: dict[str, float] = field(default_factory=dict)  # pod name -> first seen bound


class Tracker:
    def __init__(self, expected_children: int, workers: int) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, JobTimes] = {}
        self.early: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
        self.expected_children = expected_children
        self.workers = workers

    def created(self, name: str, at: float) -> None:
        with self.lock:
            times = self.jobs.setdefault(name, JobTimes(created=at))
            times.created = at

    def _times(self, name: str) -> JobTimes:
        # An event may come before the driver's create call returned: keep it, created later.
        return self.jobs.setdefault(name, JobTimes(created=float("nan")))

    def on_child(self, kind: str) -> Any:
        def handle(event_type: str, obj: dict[str, Any], at: float) -> None:
            if event_type != "ADDED":
                return
            labels = obj.get("metadata", {}).get("labels") or {}
            name = labels.get(JOB_NAME_LABEL)
            if name:
                with self.lock:
                    self._times(name).children.setdefault(kind, at)

        return handle

    def on_pod(self, event_type: str, obj: dict[str, Any], at: float) -> None:
        if event_type == "DELETED" or not (obj.get("spec") or {}).get("nodeName"):
            return
        labels = obj.get("metadata", {}).get("labels") or {}
        name = labels.get(JOB_NAME_LABEL)
        if name:
            with self.lock:
                self._times(name).bound.setdefault(obj["metadata"]["name"], at)

    def done(self) -> tuple[int, int]:
        with self.lock:
            children = sum(len(t.children) >= self.expected_children for t in self.jobs.values())
            bound = sum(len(t.bound) >= self.workers for t in self.jobs.values())
        return children, bound

    def latencies(self) -> tuple[list[float], list[float]]:
        children, bound = [], []
        with self.lock:
            for times in self.jobs.values():
                if len(times.children) >= self.expected_children:
                    children.append(max(times.children.values()) - times.created)
                if len(times.bound) >= self.workers:
                    bound.append(sorted(times.bound.values())[self.workers - 1] - times.created)
        return children, bound


# ---------------------------------------------------------------------------------------------
# The operator process and what it costs.


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # MiB
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    values["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / ticks
    return values


def apiserver_request_total(api: Any) -> float:
    response = api.rest_client.pool_manager.request(
        "GET", f"{api.configuration.host}/metrics", timeout=urllib3_timeout()
    )
    total = 0.0
    for line in response.data.decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def read_counts(path: Path) -> Counter[str]:
    try:
        return Counter(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return Counter()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# ---------------------------------------------------------------------------------------------
# One phase


def job_manifest(name: str, workers: int, devices: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FinetuneJob",
        "metadata": {"name": name},
        "spec": {
            "method": "qlora",
            "model": {"name": "meta-llama/Llama-2-7b-hf"},
            "dataset": {"name": "yahma/alpaca-cleaned"},
            "workers": workers,
            "devicesPerWorker": devices,
        },
    }


def run_phase(
    api: Any, operator_pid: int, counts_path: Path, jobs: int, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    namespace = f"scale-{jobs}-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    # The ServiceAccount admission plugin needs the namespace's default account first.
    while not core.list_namespaced_service_account(
        namespace, field_selector="metadata.name=default"
    ).items:
        time.sleep(0.2)

    tracker = Tracker(expected_children=len(CHILD_RESOURCES), workers=args.workers)
    watches = [
        RawWatch(
            api, f"{prefix}/namespaces/{namespace}/{plural}", MANAGED_BY, tracker.on_child(kind)
        )
        for kind, (prefix, plural) in CHILD_RESOURCES.items()
    ]
    watches.append(
        RawWatch(api, f"/api/v1/namespaces/{namespace}/pods", JOB_NAME_LABEL, tracker.on_pod)
    )
    for watch in watches:
        watch.start()
    time.sleep(1.0)

    samples: list[tuple[float, float]] = []
    before = proc_stats(operator_pid)
    counts_before = read_counts(counts_path)
    apiserver_before = apiserver_request_total(api)
    started = time.time()
    print(f"[{jobs}] creating {jobs} FinetuneJobs at {rate}/s in {namespace}", file=sys.stderr)

    next_sample = started
    for index in range(jobs):
        due = started + index / rate
        while True:
            now = time.time()
            if now >= next_sample:
                samples.append((now - started, proc_stats(operator_pid)["VmRSS"]))
                next_sample = now + 1.0
            if now >= due:
                break
            time.sleep(min(due - now, 0.05))
        name = f"ftj-{index:05d}"
        custom.create_namespaced_custom_object(
            group=GROUP,
            version=VERSION,
            namespace=namespace,
            plural=PLURAL,
            body=job_manifest(name, args.workers, args.devices_per_worker),
        )
        tracker.created(name, time.time())
    created_in = time.time() - started

    deadline = time.time() + args.settle_timeout
    while time.time() < deadline:
        children_done, bound_done = tracker.done()
        samples.append((time.time() - started, proc_stats(operator_pid)["VmRSS"]))
        if children_done >= jobs and bound_done >= jobs:
            break
        time.sleep(1.0)
    settled_in = time.time() - started

    # Then until every FinetuneJob is final (kwok completes the pods), so that the requests
    # per job cover a whole life: create, run, succeed.
    def phases_now() -> Counter[str]:
        found: Counter[str] = Counter()
        for item in custom.list_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL
        )["items"]:
            found[(item.get("status") or {}).get("phase") or "<none>"] += 1
        return found

    while time.time() < deadline:
        phases = phases_now()
        samples.append((time.time() - started, proc_stats(operator_pid)["VmRSS"]))
        if phases.get("Succeeded", 0) + phases.get("Failed", 0) >= jobs:
            break
        time.sleep(2.0)
    final_in = time.time() - started
    time.sleep(2.0)  # the last status writes and Events
    after = proc_stats(operator_pid)
    counts_after = read_counts(counts_path)
    apiserver_after = apiserver_request_total(api)

    phases = phases_now()

    for watch in watches:
        watch.stopping.set()
    children, bound = tracker.latencies()
    requests = counts_after - counts_before
    total_requests = sum(requests.values())
    result = {
        "jobs": jobs,
        "rate_per_s": rate,
        "workers_per_job": args.workers,
        "namespace": namespace,
        "create_seconds": round(created_in, 1),
        "settled_seconds": round(settled_in, 1),
        "all_final_seconds": round(final_in, 1),
        "jobs_with_children": len(children),
        "jobs_all_bound": len(bound),
        "children_p50_s": percentile(children, 50),
        "children_p99_s": percentile(children, 99),
        "children_max_s": max(children) if children else None,
        "bound_p50_s": percentile(bound, 50),
        "bound_p99_s": percentile(bound, 99),
        "bound_max_s": max(bound) if bound else None,
        "operator_rss_start_mib": round(before["VmRSS"], 1),
        "operator_rss_end_mib": round(after["VmRSS"], 1),
        "operator_peak_rss_mib": round(after["VmHWM"], 1),
        "operator_cpu_seconds": round(after["cpu_seconds"] - before["cpu_seconds"], 1),
        "operator_requests": total_requests,
        "operator_requests_per_job": round(total_requests / jobs, 1),
        "operator_requests_by_verb": dict(sorted(requests.items(), key=lambda kv: -kv[1])),
        "apiserver_requests_all_clients": int(apiserver_after - apiserver_before),
        "phases_at_end": dict(phases),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "rss_samples_mib": [
            (round(t, 1), round(rss, 1)) for t, rss in samples[:: max(1, len(samples) // 60)]
        ],
    }
    if not args.keep:
        core.delete_namespace(namespace)
    return result


# ---------------------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| jobs (x4 workers) | rate | create -> children p50 / p99 / max | create -> all pods bound p50 / p99 / max | operator RSS start -> end (peak) | operator CPU | operator API requests / job | all clients' requests (apiserver_request_total delta) | FinetuneJobs at end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in report["phases"]:
        lines.append(
            f"| {phase['jobs']} | {phase['rate_per_s']}/s "
            f"| {fmt(phase['children_p50_s'], ' s')} / {fmt(phase['children_p99_s'], ' s')} / {fmt(phase['children_max_s'], ' s')} "
            f"| {fmt(phase['bound_p50_s'], ' s')} / {fmt(phase['bound_p99_s'], ' s')} / {fmt(phase['bound_max_s'], ' s')} "
            f"| {phase['operator_rss_start_mib']} -> {phase['operator_rss_end_mib']} MiB ({phase['operator_peak_rss_mib']} MiB) "
            f"| {phase['operator_cpu_seconds']} s "
            f"| {phase['operator_requests_per_job']} "
            f"| {phase['apiserver_requests_all_clients']} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(phase['phases_at_end'].items()))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--shim":
        rest = sys.argv[3:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return run_shim(sys.argv[2], rest)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rate", type=float, default=5.0, help="FinetuneJobs created a second")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--devices-per-worker", type=int, default=1)
    parser.add_argument("--settle-timeout", type=float, default=600)
    parser.add_argument(
        "--operator-args",
        default="",
        help="extra arguments for `finetune-operator run` (e.g. '--qps 50 --worker-limit 16')",
    )
    parser.add_argument("--keep", action="store_true", help="keep the namespaces")
    parser.add_argument("--out", type=Path, default=RESULTS / "operator_scale.json")
    args = parser.parse_args()

    from kubernetes import config

    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        parser.error("KUBECONFIG must name the cluster (hack/dev-cluster up prints it)")
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = 16
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 16

    from kubernetes import client

    nodes = client.CoreV1Api(api).list_node().items
    gpu_nodes = [n for n in nodes if (n.status.allocatable or {}).get("gpu.intel.com/i915")]
    gpus = sum(int(n.status.allocatable["gpu.intel.com/i915"]) for n in gpu_nodes)

    counts_path = Path(f"/tmp/fto-operator-requests-{os.getpid()}.json")
    log_path = Path(f"/tmp/fto-operator-scale-{os.getpid()}.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    operator_args = ["run", "--metrics-port", "0", *args.operator_args.split()]
    env = dict(os.environ)
    with log_path.open("w") as log:
        operator = subprocess.Popen(
            [sys.executable, __file__, "--shim", str(counts_path), "--", *operator_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
    try:
        time.sleep(5)  # import, leader election, watches
        if operator.poll() is not None:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise SystemExit("the operator exited at start")
        report: dict[str, Any] = {
            "command": " ".join(["benchmarks/operator_scale.py", *sys.argv[1:]]),
            "operator_command": "finetune-operator " + " ".join(operator_args),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "note": "apiserver, etcd, controller-manager, scheduler, kwok, the operator and "
                "this driver all share these cores",
            },
            "cluster": {"gpu_nodes": len(gpu_nodes), "gpus": gpus, "nodes": len(nodes)},
            "phases": [],
        }
        for jobs in args.jobs:
            phase = run_phase(api, operator.pid, counts_path, jobs, args.rate, args)
            report["phases"].append(phase)
            print(
                json.dumps({k: v for k, v in phase.items() if k != "rss_samples_mib"}),
                file=sys.stderr,
            )
            if operator.poll() is not None:
                raise SystemExit(f"the operator died (exit {operator.returncode}); see {log_path}")
            # Let the namespace deletion drain before the next phase.
            time.sleep(10)
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
