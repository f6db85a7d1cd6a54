"""An emulated cluster (kmock + mini controllers) and a Corral runtime on the Kubernetes backend over it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("kmock")

from corral.backends.kubernetes import leader, reflector  # noqa: E402
from corral.backends.kubernetes.reflector import WatchSettings  # noqa: E402
from corral.config import Settings  # noqa: E402
from corral.runtime import Runtime  # noqa: E402
from tests.integration.conftest import free_port  # noqa: E402
from tests.k8s.cluster import NAMESPACE, ClusterEmulator, MiniControllers, kubeconfig  # noqa: E402

# Watches in tests: each lasts 2-4 s (the server's timeout, then resumed from the last version seen),
# silence beyond 1.5 s more is a dead connection, and failures are retried after 50 ms.
FAST_WATCHES = WatchSettings(min_timeout_s=2.0, read_grace_s=1.5, backoff_initial_s=0.05, backoff_max_s=0.5)


# Leader election in tests/k8s/test_leader.py, which waits for leases to expire. Elsewhere a lease of 8 s, renewed
# within 6 s: a 1 s renew deadline is lost whenever the event loop stalls for a second, which a loaded CI machine
# (the vLLM suite builds beside the main one) does, and then a Corral under test stops leading mid-test.
FAST_LEASE = {"duration_s": 1.5, "renew_deadline_s": 1.0, "retry_s": 0.2}
TEST_LEASE = {"duration_s": 8.0, "renew_deadline_s": 6.0, "retry_s": 0.5}


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[ClusterEmulator, MiniControllers, Path]]:
    import kmock

    monkeypatch.setattr(reflector, "DEFAULTS", FAST_WATCHES)
    monkeypatch.setattr(leader, "TIMING", TEST_LEASE)
    # A lost lease ends a real Corral (`os._exit(1)`, as kube-controller-manager does); here it would end the whole
    # pytest run with no summary. It fails the test that lost it instead.
    lost: list[str] = []
    monkeypatch.setattr(leader, "_exit", lambda: lost.append("lost"))
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        config = kubeconfig(str(server.url), tmp_path / "kubeconfig")
        async with MiniControllers(emulator) as controllers:
            yield emulator, controllers, config
    if lost:
        pytest.fail("a Corral under test lost its leader lease (its event loop stalled past the renew deadline, or "
                    "another candidate took it): a real one would have exited")


@pytest.fixture
def engine() -> str:
    return "vllm"  # the emulator runs no containers: GPU requests and all, nothing starts


async def start_runtime(config: Path, data_dir: Path, **settings: object) -> Runtime:
    runtime = Runtime(Settings(data_dir=data_dir, backend="kubernetes", kubeconfig=config, kubernetes_namespace=NAMESPACE,
                               port=free_port(), gateway_port=free_port(), gateway_data_plane="python", **settings))
    await runtime.start()
    return runtime


@pytest.fixture
async def runtime(cluster: tuple[ClusterEmulator, MiniControllers, Path], tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = await start_runtime(cluster[2], tmp_path / "data")
    yield runtime
    await runtime.close()
