"""Browser tests: the served app in headless Chromium, as a user sees it."""

import pytest
from playwright.sync_api import expect

from tests.browser import chromium_page, require_chromium, served_app, wait_until_idle

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url():
    require_chromium()
    with served_app() as url:
        yield url


def metric(page, label: str):
    box = page.locator("[data-testid='stMetric']").filter(has_text=label).first
    return box.locator("[data-testid='stMetricValue']")


def test_default_prompt_shows_mary_then_a_typed_prompt_survives_reload(app_url, tmp_path):
    with chromium_page() as page:
        page.goto(app_url)
        page.get_by_text("Next-token distribution").wait_for(timeout=180_000)
        wait_until_idle(page)
        expect(metric(page, "Target")).to_have_text("␣Mary", timeout=60_000)
        page.screenshot(path=str(tmp_path / "inspector.png"), full_page=True)

        prompt = page.get_by_role("textbox", name="Prompt", exact=True)
        prompt.fill("The capital of France is")
        prompt.press("Control+Enter")
        page.wait_for_function("() => window.location.search.includes('France')", timeout=60_000)
        wait_until_idle(page)
        expect(metric(page, "Target")).to_have_text("␣Paris", timeout=60_000)

        page.reload()
        page.get_by_text("Next-token distribution").wait_for(timeout=60_000)
        wait_until_idle(page)
        assert page.get_by_role("textbox", name="Prompt", exact=True).input_value() == "The capital of France is"
        expect(metric(page, "Target")).to_have_text("␣Paris", timeout=60_000)
