"""Page logic with NiceGUI's simulated `User` (no browser): fast checks of what each page shows and refuses.

The runtime is real (SQLite file, simulator replica processes); only the browser is simulated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nicegui import ui
from nicegui.testing.user import User
from nicegui.testing.user_simulation import user_simulation

from corral.config import Settings
from corral.runtime import Runtime
from corral.ui import live
from corral.ui.shell import root
from tests.conftest import wait_for_async
from tests.integration.conftest import free_port


async def _runtime(data_dir: Path, **settings: object) -> Runtime:
    runtime = Runtime(Settings(data_dir=data_dir, port=free_port(), gateway_port=free_port(), gateway_data_plane="python",
                               stop_grace_s=2, **settings))
    await runtime.start()
    live.bind(runtime)
    return runtime


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = await _runtime(tmp_path / "data")
    yield runtime
    for deployment in runtime.backend.list_deployments():
        await (await runtime.backend.delete_deployment(deployment.name))
    await runtime.close()


@pytest.fixture
async def user(runtime: Runtime) -> AsyncIterator[User]:
    async with user_simulation(root=root) as user:
        yield user


async def test_finetune_page_without_gpu(user: User) -> None:
    await user.open("/finetune")
    await user.should_see("No GPU detected: finetuning runs on the CPU")
    await user.should_see("Recommendation:")
    await user.should_see("New finetune task")


async def test_deploy_form_shows_the_refusal_inline_and_changes_nothing(user: User, runtime: Runtime) -> None:
    await user.open("/")
    await user.should_see("Nothing deployed yet")
    user.find(kind=ui.checkbox, content="Deploy as Model Pool").click()
    await user.should_see("Deploy", kind=ui.button)
    user.find(kind=ui.checkbox, content="Deploy as Model Pool").click()
    user.find(kind=ui.button, content="Deploy as Model Pool").click()  # no model, no tag
    await user.should_see("modelTag")
    assert runtime.backend.list_deployments() == []
    assert runtime.store.history() == []


async def test_scale_refusal_and_assignment_counts(user: User, runtime: Runtime) -> None:
    from corral.controller import DeploySpec

    result = await runtime.controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="qwen-06b", replicas=2,
                                                        deploy_as_pool=True, engine_args=["--ttft-ms", "5"]))
    pool = result.deployment.name
    await runtime.controller.deploy_service("production-chat", pool, "production", False)
    await user.open("/")
    await user.should_see("Assignment: production(0) | unassigned(2)")
    pod = runtime.backend.list_pods(pool)[0].name
    await runtime.controller.assign_pod(pod, "production", None)  # from elsewhere (API, CLI): the page follows
    await user.should_see("Assignment: production(1) | unassigned(1)")
    await user.should_see("available for scale-down: 1")
    await user.open("/history")
    (table,) = user.find(kind=ui.table).elements
    assert [r["action"] for r in table.rows] == ["assign", "deploy-service", "deploy"]  # newest first
    await runtime.controller.distribute(pool, {"production": 1}, None)  # the page follows this one too
    await wait_for_async(lambda: table.rows[0]["action"] == "distribute", what="the distribution in the history table")


async def test_token_is_required_for_changes(tmp_path: Path) -> None:
    runtime = await _runtime(tmp_path / "data", api_token="s3cret")
    try:
        async with user_simulation(root=root) as user:
            await user.open("/")
            user.find(kind=ui.button, content="Deploy as Model Pool").click()
            await user.should_see("this Corral requires an API token")
            await wait_for_async(lambda: runtime.store.history() == [], what="nothing recorded")
    finally:
        await runtime.close()


def test_pods_table_pages_filters_and_sorts_on_the_server() -> None:
    from corral.ui.inference import page_of

    rows = [{"name": f"pool-{i:04d}", "status": "Running", "model": "m", "business": "production" if i % 3 == 0 else "unassigned",
             "placement": "local · CPU", "createdAt": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}"} for i in range(1000)]
    page, pagination = page_of(rows, "", {"rowsPerPage": 25, "sortBy": "name", "page": 2})
    assert [r["name"] for r in page] == [f"pool-{i:04d}" for i in range(25, 50)] and pagination["rowsNumber"] == 1000
    page, pagination = page_of(rows, "production", {"rowsPerPage": 25, "sortBy": "name", "page": 99})
    assert pagination == {"rowsPerPage": 25, "sortBy": "name", "descending": False, "page": 14, "rowsNumber": 334}  # clamped
    assert len(page) == 334 - 13 * 25 and all(r["business"] == "production" for r in page)
    page, _ = page_of(rows, "", {"rowsPerPage": 3, "sortBy": "age", "descending": False, "page": 1})
    assert [r["name"] for r in page] == ["pool-0999", "pool-0998", "pool-0997"]  # youngest first
    page, pagination = page_of(rows, "", {"rowsPerPage": 0, "sortBy": "name", "descending": True})
    assert len(page) == 1000 and page[0]["name"] == "pool-0999" and pagination["rowsPerPage"] == 0


def test_history_rows_summarise_what_changed() -> None:
    from corral.ui.history import history_row

    def row(before: object, after: object, outcome: str = "success") -> dict:
        return history_row({"id": 1, "timestamp": "2026-01-01T10:00:00.123+00:00", "action": "assign", "target": "p",
                            "before": before, "after": after, "outcome": outcome, "message": None})

    assigned = row({"business": "unassigned"}, {"business": "production"})
    assert assigned["change"] == "business: unassigned → production" and assigned["timestamp"] == "2026-01-01 10:00:00"
    assert '"business": "production"' in assigned["full"] and assigned["colour"] == "positive" and assigned["message"] == ""
    moved = row({"unassigned": 3, "production": 1}, {"unassigned": 0, "production": 1, "testing": 3})
    assert moved["change"] == "unassigned: 3 → 0, testing: – → 3"  # unchanged keys left out
    assert row(None, {"model": "m", "business": "b"})["change"] == "created model: m, business: b"
    assert row({"model": "m"}, None)["change"] == "removed model: m"
    assert row(None, None)["change"] == "–" and row(None, None)["full"] == ""  # no tooltip for nothing
    wide = row(None, {f"k{i}": i for i in range(9)})
    assert wide["change"].endswith("k5: 5 (+3 more)")
    assert row({"replicas": 3}, {"replicas": 0}, "refused")["colour"] == "warning"
    assert row({"phase": "Running"}, {"phase": "Failed"}, "failed")["colour"] == "negative"


def test_engine_choices_default_to_an_installed_engine() -> None:
    from corral.ui.inference import engine_choices

    labels, default = engine_choices("local")
    assert labels["simulator"] == "simulator (simulator)" and "not installed" not in labels[default]
    assert default == next(n for n in ("vllm", "sglang", "transformers", "simulator") if "not installed" not in labels[n])
    labels, default = engine_choices("kubernetes")  # engines run in their images: all available, vLLM first
    assert default == "vllm" and not any("not installed" in label for label in labels.values())


async def test_the_inference_page_watches_the_load_only_while_open(user: User, runtime: Runtime) -> None:
    await user.open("/")
    await user.should_see("Business services")
    assert runtime.load.watchers == 1  # the monitor publishes `load` events once a second for this page
    user.find(marker="nav-history").click()  # client-side navigation: the inference page is removed
    await user.should_see(kind=ui.table)
    await wait_for_async(lambda: runtime.load.watchers == 0, timeout=5, what="the page's watch released")
