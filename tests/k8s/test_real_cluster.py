"""Opt-in: the same scenarios against a real cluster (kind, k3s, EKS…), when CORRAL_E2E_KUBECONFIG is set.

    CORRAL_E2E_KUBECONFIG=~/.kube/config CORRAL_E2E_NAMESPACE=corral-e2e ./scripts/test.sh tests/k8s/test_real_cluster.py

Replicas run Corral's simulator from Corral's image (CORRAL_E2E_IMAGE, default corral/corral:0.1.0;
build it with `docker build -t corral/corral:0.1.0 .` and load it into the cluster, e.g.
`kind load docker-image corral/corral:0.1.0`). The namespace must exist and be empty; the tests
delete what they create. Scenarios that need to steer the cluster's own controllers (a ReplicaSet
ignoring the deletion cost, a frozen rollout) run against the emulator only.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.runtime import Runtime
from tests.conftest import wait_for_async
from tests.integration.conftest import free_port
from tests.k8s.test_backend_contract import (  # noqa: F401 (collected here, against the real cluster)
    test_pool_safe_scale_down_uses_deletion_cost_and_refuses_below_assigned,
    test_pool_services_and_assignment_are_cluster_objects,
    test_replaced_pod_is_reassigned,
)
from tests.k8s.test_cluster_semantics import (  # noqa: F401
    test_a_pool_scaled_by_an_hpa_is_not_scaled_by_corral,
    test_any_scale_down_prefers_unassigned_pods,
)

KUBECONFIG = os.environ.get("CORRAL_E2E_KUBECONFIG")
pytestmark = pytest.mark.skipif(not KUBECONFIG, reason="set CORRAL_E2E_KUBECONFIG to run against a real cluster")


@pytest.fixture
def engine() -> str:
    return "simulator"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    image = os.environ.get("CORRAL_E2E_IMAGE", "corral/corral:0.1.0")
    settings = Settings(data_dir=tmp_path / "data", backend="kubernetes", kubeconfig=Path(str(KUBECONFIG)).expanduser(),
                        kubernetes_namespace=os.environ.get("CORRAL_E2E_NAMESPACE", "corral-e2e"),
                        kubernetes_images={"simulator": image}, kubernetes_tolerations=[],
                        port=free_port(), gateway_port=free_port(), gateway_data_plane="python")
    runtime = Runtime(settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        for service in runtime.controller.list_business_services():
            await runtime.controller.delete_service(service.name, force=True)
        for deployment in runtime.backend.list_deployments():
            await runtime.controller.delete_deployment(deployment.name, force=True)
        await wait_for_async(lambda: not runtime.backend.list_pods(), timeout=300, what="the test's pods to go")
        await runtime.close()
