"""Fixtures for the e2e tests: one real local Kubernetes cluster per test session.

Fixtures:
- ``cluster`` (session): a :class:`local_cluster.Cluster`, started with ``hack/dev-cluster up`` and
  taken down at the end; or, with FTO_REUSE_CLUSTER=1, the cluster KUBECONFIG names (left up).
  (The CRDs are installed by ``finetunejob_crd``, for the tests that ask for it.)
- ``kubectl`` (session): ``kubectl(*args, input=None, check=False) -> CompletedProcess`` bound to
  the cluster's kubeconfig, output captured as text.
- ``kube_api`` (session): a ``kubernetes.client.ApiClient`` for the cluster.
- ``core_api`` / ``batch_api`` / ``custom_api`` (session): CoreV1Api, BatchV1Api and
  CustomObjectsApi on that client.
- ``namespace`` (function): a fresh namespace name for the test (its default service account
  already made), deleted afterwards.
- ``finetunejob_crd`` (session): installs crds/ (`kubectl apply -f crds/`); request it in any
  test that creates FinetuneJobs.
- ``ftj``, ``operator_env``, ``operator`` (function): from operator_fixtures.py, the operator
  as a subprocess watching ``namespace`` and helpers for its FinetuneJobs.

If the cluster cannot start, every e2e test errors with the components' logs: never a skip,
so CI cannot pass without a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from subprocess import CompletedProcess
from typing import Any

import pytest
from local_cluster import (
    CRDS_DIR,
    Cluster,
    install_crds,
    running_under_ci,
    start_cluster,
    stop_cluster,
    unique_name,
    wait_for,
)
from operator_fixtures import ftj_fixture, operator_env_fixture, operator_fixture

__all__ = ["ftj_fixture", "operator_env_fixture", "operator_fixture"]  # registered as fixtures


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e needs the cluster, so it is all selected by `-m e2e`.
    for item in items:
        if "tests/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[pytest.TestReport]:
    # Kept on the item (rep_setup, rep_call, rep_teardown) so that a fixture can tell, when it
    # tears down, whether the test failed (the operator fixture prints its logs then).
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def crd_manifests_present() -> bool:
    return CRDS_DIR.is_dir() and any(CRDS_DIR.glob("*.yaml"))


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    started = start_cluster()
    try:
        yield started
    finally:
        stop_cluster(started)


@pytest.fixture(scope="session")
def kubectl(cluster: Cluster) -> Callable[..., CompletedProcess[str]]:
    return cluster.kubectl


@pytest.fixture(scope="session")
def kube_api(cluster: Cluster) -> Iterator[Any]:
    client = cluster.api_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def core_api(kube_api: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(kube_api)


@pytest.fixture(scope="session")
def batch_api(kube_api: Any) -> Any:
    from kubernetes import client

    return client.BatchV1Api(kube_api)


@pytest.fixture(scope="session")
def custom_api(kube_api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(kube_api)


@pytest.fixture(scope="session")
def finetunejob_crd(cluster: Cluster) -> None:
    """Installs crds/ once per session (`kubectl apply -f crds/`, then waits until Established).

    Only tests that need the CRD ask for it, so a broken CRD fails those tests (with the API
    server's reason) without hiding what the rest say about the cluster.
    """
    if not crd_manifests_present():
        message = f"no CRD manifests in {CRDS_DIR}"
        if running_under_ci():
            pytest.fail(message)
        pytest.skip(message)
    applied = install_crds(cluster)
    if applied.returncode != 0:
        pytest.fail(f"kubectl apply -f crds/ failed:\n{applied.stderr}")


@pytest.fixture
def namespace(request: pytest.FixtureRequest, core_api: Any) -> Iterator[str]:
    from kubernetes import client

    name = unique_name(f"e2e-{request.node.name}")
    core_api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    # The ServiceAccount admission plugin rejects pods until the controller manager has made
    # the namespace's default service account.
    def default_service_account_exists() -> bool:
        accounts = core_api.list_namespaced_service_account(
            name, field_selector="metadata.name=default"
        )
        return bool(accounts.items)

    wait_for(
        default_service_account_exists, timeout=60, description=f"serviceaccount {name}/default"
    )
    try:
        yield name
    finally:
        # Not waited for: the namespace controller finishes it in the background.
        core_api.delete_namespace(name)
