"""Browser tests: Playwright driving Debian's Chromium against a real `corral serve`.

Screenshots go to test-artifacts/screenshots/ (kept by CI as artifacts; the README's images in
docs/screenshots/ are copies of them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import CorralServer, running_corral

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).parents[2] / "test-artifacts" / "screenshots"

NO_BROWSER = "Debian's chromium is not installed (apt-get install -y chromium)"


@pytest.fixture(scope="module")  # closed per module: sync Playwright's loop must not outlive into async tests
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        if os.environ.get("CORRAL_REQUIRE_BROWSER"):  # CI: a missing browser is a failure, not a skip
            pytest.fail(NO_BROWSER)
        pytest.skip(NO_BROWSER)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    yield from _page(browser, 1440, 1000)


@pytest.fixture
def laptop_page(browser: object) -> Iterator[object]:
    """A 1280×800 page: the laptop screen that issue 30's newcomer used (labels cut off, a table scrolled sideways)."""
    yield from _page(browser, 1280, 800)


def _page(browser: object, width: int, height: int) -> Iterator[object]:
    context = browser.new_context(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[CorralServer]:
    with running_corral(tmp_path / "data") as server:
        yield server


def screenshot(page: object, name: str, element: object | None = None) -> None:
    """The whole page (from the top: the header is fixed), or one element of it."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = str(SCREENSHOTS / f"{name}.png")
    # animations="disabled": a floating label or a closing menu is shown where it ends, not half-way
    if element is not None:
        element.screenshot(path=path, animations="disabled")  # type: ignore[attr-defined]
    else:
        page.evaluate("window.scrollTo(0, 0)")  # type: ignore[attr-defined]
        page.screenshot(path=path, full_page=True, animations="disabled")  # type: ignore[attr-defined]
