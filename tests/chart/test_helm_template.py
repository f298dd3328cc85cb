"""The Helm chart, rendered with `helm template` (no cluster): what it installs, how each value
shapes it, that the schema rejects typos, and that its CRD and the operator's flags are the
project's own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import (
    CHART,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    find,
    helm,
    load_values,
    one,
    render,
    template_args,
)

FULLNAME = f"{RELEASE}-finetune-operator"
CRD_FILE = REPO_ROOT / "crds" / "finetunejob.yaml"
RULES_FILE = CHART / "files" / "operator-rules.yaml"
LEADER_RULES_FILE = CHART / "files" / "leader-election-rules.yaml"


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", FULLNAME)
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


# -- lint and the default install ---------------------------------------------------------------


def test_helm_lint_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE)
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_helm_lint_namespaced_mode_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART), "--set", "operator.watchNamespaces={a,b}")
    assert "0 chart(s) failed" in result.stdout


def test_default_install_objects(default: list[dict[str, Any]]) -> None:
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in default)
    assert kinds == sorted(
        [
            "CustomResourceDefinition/finetunejobs.finetune.dev",
            f"ClusterRole/{FULLNAME}",
            f"ClusterRoleBinding/{FULLNAME}",
            f"Role/{FULLNAME}-leader-election",
            f"RoleBinding/{FULLNAME}-leader-election",
            f"ServiceAccount/{FULLNAME}",
            f"Service/{FULLNAME}-metrics",
            f"Deployment/{FULLNAME}",
        ]
    )
    for obj in default:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_deployment_is_locked_down(default: list[dict[str, Any]]) -> None:
    pod = one(default, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # Read-only root: the only writable place is an emptyDir on /tmp.
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert env_of(container)["HOME"] == "/tmp"


def test_deployment_probes_resources_replicas() -> None:
    objects = render("replicas=3", "resources.limits.memory=1Gi", "metrics.port=9400")
    deployment = one(objects, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        assert container[probe]["periodSeconds"] > 0


def test_image_defaults_to_app_version(default: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert version and chart["appVersion"] == version.group(1)
    image = operator_container(default)["image"]
    assert image == f"ghcr.io/finetune-operator/operator:{chart['appVersion']}"
    tagged = operator_container(render("image.tag=dev", "image.repository=r.example/op"))
    assert tagged["image"] == "r.example/op:dev"


# -- the operator's configuration is what `finetune-operator run` understands --------------------


def parse_operator(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The RunConfig the operator builds from the container's args and env, as in the pod."""
    main = pytest.importorskip("finetune_operator.main")
    assert container["command"] == ["finetune-operator"]
    assert container["args"][0] == "run"
    for name in [n for n in __import__("os").environ if n.startswith("FTO_")]:
        monkeypatch.delenv(name)
    for entry in container["env"]:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
    monkeypatch.setenv("POD_NAME", "fto-finetune-operator-abc")
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    return main.parse_args(container["args"][1:])


def test_operator_understands_the_default_settings(
    default: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    values = load_values()
    config = parse_operator(operator_container(default), monkeypatch)
    assert config.clusterwide is True
    assert config.settings.namespaces == ()
    assert config.settings.trainer_image == values["trainer"]["image"]
    assert config.settings.image_pull_policy == values["trainer"]["imagePullPolicy"]
    assert config.settings.device_resources["xpu"] == values["trainer"]["xpuResource"]
    assert config.metrics_port == values["metrics"]["port"]
    assert config.log_format == "json"
    assert config.worker_limit == values["operator"]["workerLimit"]
    assert config.leader_elect is True
    assert config.lease_namespace == NAMESPACE
    assert config.identity == "fto-finetune-operator-abc"
    # The operator's test-only hook never reaches a real install.
    assert config.settings.extra_pod_labels == {}


def test_operator_understands_namespaced_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(
        "operator.watchNamespaces={team-a,team-b}",
        "trainer.image=registry.example/trainer:1-xpu",
        "trainer.xpuResource=gpu.intel.com/xe",
        "operator.logFormat=text",
        "operator.leaderElection.enabled=false",
        "operator.extraArgs={--resync-seconds=5}",
    )
    config = parse_operator(operator_container(objects), monkeypatch)
    assert config.clusterwide is False
    assert config.settings.namespaces == ("team-a", "team-b")
    assert config.settings.trainer_image == "registry.example/trainer:1-xpu"
    assert config.settings.device_resources["xpu"] == "gpu.intel.com/xe"
    assert config.log_format == "text"
    assert config.leader_elect is False
    assert config.resync_seconds == 5


# -- RBAC ---------------------------------------------------------------------------------------


def operator_rules() -> list[dict[str, Any]]:
    assert RULES_FILE.exists(), (
        f"{RULES_FILE.relative_to(REPO_ROOT)} is missing (the operator's RBAC)"
    )
    rules = yaml.safe_load(RULES_FILE.read_text())
    assert isinstance(rules, list) and rules, "operator-rules.yaml must be a list of PolicyRules"
    return rules


def test_clusterwide_rbac_is_the_operators_rules(default: list[dict[str, Any]]) -> None:
    role = one(default, "ClusterRole", FULLNAME)
    assert role["rules"] == operator_rules()
    binding = one(default, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]


def test_namespaced_rbac_has_no_cluster_permissions() -> None:
    objects = render("operator.watchNamespaces={team-a,team-b}")
    # No cluster-wide permission at all (the operator does not scan CRDs or namespaces).
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in find(objects, "Role", FULLNAME)}
    assert sorted(roles) == ["team-a", "team-b"]
    for namespace, role in roles.items():
        assert role["rules"] == operator_rules()
        binding = one(
            [
                b
                for b in find(objects, "RoleBinding", FULLNAME)
                if b["metadata"]["namespace"] == namespace
            ],
            "RoleBinding",
        )
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0] == {
            "kind": "ServiceAccount",
            "name": FULLNAME,
            "namespace": NAMESPACE,
        }
    env = env_of(operator_container(objects))
    assert env["FTO_NAMESPACES"] == "team-a,team-b"


def test_leader_election_role_in_release_namespace() -> None:
    leader_rules = yaml.safe_load(LEADER_RULES_FILE.read_text())
    for values in ((), ("operator.watchNamespaces={team-a}",)):
        objects = render(*values)
        role = one(objects, "Role", f"{FULLNAME}-leader-election")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == leader_rules
        assert any("leases" in r["resources"] for r in role["rules"])
        binding = one(objects, "RoleBinding", f"{FULLNAME}-leader-election")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0]["name"] == FULLNAME


def test_rbac_and_service_account_can_be_turned_off() -> None:
    objects = render(
        "rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=my-operator"
    )
    kinds = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount")
    for kind in kinds:
        assert not find(objects, kind), kind
    pod = one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "my-operator"


# -- the CRD --------------------------------------------------------------------------------------


def test_chart_crd_is_the_projects_crd(default: list[dict[str, Any]]) -> None:
    # The chart's copy is byte-for-byte crds/finetunejob.yaml (hack/sync-generated.py).
    copy = CHART / "files" / "crds" / "finetunejob.yaml"
    assert copy.read_text() == CRD_FILE.read_text(), (
        "charts/finetune-operator/files/crds/finetunejob.yaml drifted from crds/: "
        "run hack/sync-generated.py"
    )
    rendered = one(default, "CustomResourceDefinition")
    expected = yaml.safe_load(CRD_FILE.read_text())
    assert rendered["spec"] == expected["spec"]
    assert rendered["metadata"]["name"] == expected["metadata"]["name"]
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_toggles() -> None:
    assert not find(render("crds.enabled=false"), "CustomResourceDefinition")
    crd = one(render("crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


def test_generated_files_are_in_step() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "sync-generated.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_service_and_service_monitor(default: list[dict[str, Any]]) -> None:
    service = one(default, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    pod_labels = one(default, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not find(default, "ServiceMonitor")

    objects = render(
        "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prometheus"
    )
    monitor = one(objects, "ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = one(objects, "Service", f"{FULLNAME}-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )

    objects = render("metrics.enabled=false", "metrics.serviceMonitor.enabled=true")
    assert not find(objects, "Service") and not find(objects, "ServiceMonitor")


# -- values.yaml and values.schema.json -------------------------------------------------------------


@pytest.mark.parametrize(
    "typo",
    [
        "replica=2",  # top level
        "image.tags=x",  # nested
        "operator.watchNamespace={a}",
        "trainer.xpuResources=gpu.intel.com/xe",
        "crds.keepp=false",
        "metrics.serviceMonitor.enable=true",
        "operator.leaderElection.enable=false",
    ],
)
def test_schema_rejects_typos(typo: str) -> None:
    result = helm(*template_args(typo), check=False)
    assert result.returncode != 0
    assert "additional properties" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "bad",
    [
        "replicas=-1",
        "operator.logFormat=xml",
        "image.pullPolicy=Sometimes",
        "metrics.port=70000",
        "operator.watchNamespaces={Not_A_Namespace}",
    ],
)
def test_schema_rejects_bad_values(bad: str) -> None:
    assert helm(*template_args(bad), check=False).returncode != 0


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for name, child in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        paths.add(path)
        if child.get("additionalProperties") is False:
            paths |= _schema_paths(child, path + ".")
    return paths


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Keys of values.yaml, descending where the schema fixes the keys (free-form maps such
    as resources or podSecurityContext are Kubernetes types: their keys are not ours)."""
    paths = set()
    for name, value in values.items():
        path = f"{prefix}{name}"
        paths.add(path)
        child = (schema.get("properties") or {}).get(name, {})
        if isinstance(value, dict) and child.get("additionalProperties") is False:
            paths |= _value_paths(value, child, path + ".")
    return paths


def test_every_value_is_in_the_schema_and_back() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    values = load_values()
    in_values = _value_paths(values, schema)
    in_schema = _schema_paths(schema) - {"global"}
    assert in_values - in_schema == set(), "values.yaml keys missing from values.schema.json"
    assert in_schema - in_values == set(), (
        "values.schema.json keys without a default in values.yaml"
    )


def test_every_value_is_commented() -> None:
    """Every key of values.yaml has a comment just above it, or sits inside a commented key
    (e.g. the fields of a probe), or is a section whose keys are each commented."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, bool]] = []  # indent, key, commented
    uncommented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        commented = number > 0 and lines[number - 1].strip().startswith("#")
        covered = commented or any(c for _, _, c in stack)
        section = line.rstrip().endswith(":")
        if not covered and not section:
            uncommented.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, commented))
    assert uncommented == []


def test_values_file_with_every_option_renders(tmp_path: Path) -> None:
    values = {
        "fullnameOverride": "ftj-operator",
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"extraEnv": [{"name": "FTO_API_QPS", "value": "5"}]},
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "ml"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "system-cluster-critical",
        "serviceAccount": {"annotations": {"team": "ml"}},
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    objects = render(values_files=(path,))
    pod = one(objects, "Deployment", "ftj-operator")["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert one(objects, "ServiceAccount", "ftj-operator")["metadata"]["annotations"] == {
        "team": "ml"
    }


def test_notes_tell_the_next_commands(tmp_path: Path) -> None:
    """NOTES.txt, rendered as a template of a copy of the chart (helm template skips NOTES)."""
    import shutil

    chart = tmp_path / "finetune-operator"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes-as-configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '    {{- include "notes" . | nindent 4 }}\n'
        + '{{- define "notes" }}\n'
        + notes
        + "\n{{- end }}\n"
    )
    result = helm(
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/notes-as-configmap.yaml",
    )
    text = yaml.safe_load(result.stdout)["data"]["notes"]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}" in text
    assert "kubectl get ftj -w" in text
    assert "kubectl describe ftj" in text
    assert "every namespace" in text


def test_trainer_defaults_are_the_operators() -> None:
    """The chart's trainer image and Intel GPU resource are the operator's own defaults, so a
    FinetuneJob behaves the same under `finetune-operator render` and a Helm install."""
    from finetune_operator.api import DEFAULT_DEVICE_RESOURCE, Device
    from finetune_operator.settings import DEFAULT_TRAINER_IMAGE

    trainer = load_values()["trainer"]
    assert trainer["image"] == DEFAULT_TRAINER_IMAGE
    assert trainer["xpuResource"] == DEFAULT_DEVICE_RESOURCE[Device.XPU]


def test_packaged_chart_carries_its_files(tmp_path: Path) -> None:
    """`helm package` keeps the CRD copy and the RBAC rule files (real files, not symlinks), and
    the package renders the same objects as the folder."""
    import tarfile

    helm("package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("finetune-operator-*.tgz")
    with tarfile.open(package) as archive:
        names = set(archive.getnames())
    for path in (
        "files/crds/finetunejob.yaml",
        "files/operator-rules.yaml",
        "files/leader-election-rules.yaml",
        "values.schema.json",
        "templates/NOTES.txt",
    ):
        assert f"finetune-operator/{path}" in names, path
    from_package = helm("template", RELEASE, str(package), "--namespace", NAMESPACE).stdout
    from_folder = helm(*template_args()).stdout
    assert from_package == from_folder
