"""Browser tests: the served app in headless Chromium, as a user sees it."""

import re
import time
from urllib.parse import quote

import pytest
from playwright.sync_api import expect

from tests.browser import RESULT, chromium_page, chromium_pages, require_chromium, served_app, wait_until_idle
from tests.conftest import IOI_PROMPT

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
        page.goto(f"{app_url}/inspector")
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
        expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_have_value("The capital of France is",
                                                                                    timeout=60_000)
        expect(metric(page, "Target")).to_have_text("␣Paris", timeout=60_000)


def test_clicking_a_graph_node_opens_its_details_and_the_link_keeps_it(app_url):
    url = f"{app_url}/graph?prompt=The+capital+of+France+is&target=+Paris&k=60"
    with chromium_page(height=1100) as page:
        page.goto(url)
        page.get_by_text("Nodes shown").wait_for(timeout=180_000)
        wait_until_idle(page)
        expect(page.get_by_text("Click a node in the graph")).to_be_visible()
        page.locator("[data-testid='stPlotlyChart'] path.point").nth(20).click(force=True)
        page.get_by_text("Strongest incoming edges").wait_for(timeout=60_000)
        page.wait_for_function("() => window.location.search.includes('node=')", timeout=30_000)
        wait_until_idle(page)
        shared_link = page.url
        heading = page.locator("h3").filter(has_text="@").first.inner_text()

    with chromium_page(height=1100) as fresh:  # a collaborator opens the link
        fresh.goto(shared_link)
        fresh.get_by_text("Strongest incoming edges").wait_for(timeout=180_000)
        expect(fresh.locator("h3").filter(has_text="@").first).to_have_text(heading)


def test_clicking_a_heatmap_cell_shows_the_drill_down(app_url):
    with chromium_page(height=1100) as page:
        page.goto(f"{app_url}/heatmaps?prompt=The+capital+of+France+is&target=+Paris")
        page.get_by_text("Click a cell").wait_for(timeout=180_000)
        wait_until_idle(page)
        # the grid's click layer: one transparent square per cell, in row-major order
        cells = page.locator("[data-testid='stPlotlyChart']").first.locator("path.point")
        cells.nth(30 * 6).wait_for(state="attached", timeout=60_000)  # 31 rows x 6 positions (with <|endoftext|>)
        # the layer and token labels are inside the figure, not cut off by its margins
        chart_box = page.locator("[data-testid='stPlotlyChart']").first.bounding_box()
        for label in (page.locator(".ytick text").filter(has_text="L29").first,
                      page.locator(".xtick text").filter(has_text="France").first):
            box = label.bounding_box()
            bottom = chart_box["y"] + chart_box["height"]
            assert box and box["x"] >= chart_box["x"] and box["y"] + box["height"] <= bottom
        cells.nth(cells.count() - 1).click(force=True)  # top row, last position
        page.get_by_text("Logit lens, top 10").wait_for(timeout=60_000)
        expect(page.locator("h3").filter(has_text="position 5").first).to_be_visible()
        page.wait_for_function("() => window.location.search.includes('cell=')", timeout=30_000)
        wait_until_idle(page)
        # the attention section is closed (drawn on demand); a head of the drill-down opens it there
        expect(page.locator("[data-testid='stPlotlyChart']")).to_have_count(1)
        page.get_by_role("button", name="head 2:").first.click()
        page.get_by_text("Layer 29, head 2").wait_for(timeout=60_000)
        page.wait_for_function("() => /attn=/.test(window.location.search)", timeout=30_000)
        wait_until_idle(page)
        head_grid = page.locator("[data-testid='stPlotlyChart']").filter(has_text="head 5")
        head_grid.locator("path.point").nth(5 * 6 * 6).click(force=True)  # head-major: 6 x 6 cells per head
        page.wait_for_function("() => window.location.search.includes('head=5')", timeout=60_000)
        expect(page.get_by_text("Layer 29, head 5")).to_be_visible(timeout=60_000)
        shared = page.url
    with chromium_page(height=1100) as fresh:  # the link reopens the section with its head
        fresh.goto(shared)
        fresh.get_by_text("Layer 29, head 5").wait_for(timeout=180_000)


def test_clicking_a_circuit_node_and_ablating_it(app_url):
    with chromium_page(height=1400) as page:
        page.goto(f"{app_url}/circuit?cn=200")
        page.get_by_text("Click a head or an MLP").wait_for(timeout=180_000)
        wait_until_idle(page)
        chart = page.locator("[data-testid='stPlotlyChart']").first
        chart.locator("path.point").nth(100).click(force=True)
        page.get_by_text("Circuit edges in").wait_for(timeout=60_000)
        page.wait_for_function("() => window.location.search.includes('cnode=')", timeout=30_000)
        wait_until_idle(page)
        page.get_by_role("button", name="Ablate (corrupt this node's output)").click()
        expect(metric(page, "Model metric")).to_be_visible(timeout=60_000)


def test_save_open_from_the_gallery_present_and_copy_link(app_url):
    with chromium_page(height=1300) as page:
        page.goto(f"{app_url}/circuit?cnode=a23.h3&cn=150&cprune=0")
        page.get_by_text("Circuit edges in").wait_for(timeout=180_000)
        wait_until_idle(page)
        page.get_by_text("Save analysis, label nodes").click()
        page.get_by_role("textbox", name="Title").fill("Browser round trip")
        page.get_by_role("textbox", name="Notes").fill("a23.h3 writes Mary")
        page.get_by_role("button", name="Save to the gallery").click()
        page.get_by_text("Saved as #").wait_for(timeout=60_000)

        page.get_by_role("link", name="Gallery").click()
        page.get_by_text("Browser round trip").first.wait_for(timeout=60_000)
        wait_until_idle(page)
        page.locator("[class*='st-key-open_'] button").first.click()
        page.get_by_text("Shown as saved, not recomputed").wait_for(timeout=60_000)
        page.wait_for_function("() => window.location.pathname.endsWith('/circuit')", timeout=30_000)
        expect(page.locator("h2, h3").filter(has_text="a23.h3").first).to_be_visible(timeout=60_000)
        expect(metric(page, "Circuit edges")).to_have_text("150")

        wait_until_idle(page)  # once, under load, a click during the reopened page's run opened no link
        page.get_by_text("Copy link").click()
        link = page.locator("[data-testid='stSidebar'] code").first.inner_text()
        assert "/circuit?" in link and "saved=" in link and "cnode=a23.h3" in link

        page.get_by_role("button", name="Present (hide controls, enlarge figures)").click()
        exit_button = page.get_by_role("button", name="Exit presentation")
        exit_button.wait_for(timeout=60_000)
        expect(page.locator("[data-testid='stSidebar']")).to_be_hidden()
        wait_until_idle(page)
        expect(page.get_by_role("textbox", name="Answer token").first).to_be_hidden()
        exit_button.click()
        expect(page.get_by_role("textbox", name="Answer token").first).to_be_visible(timeout=60_000)


def test_exported_figure_html_opens_offline(tmp_path):
    from components.circuit_view import faithfulness_curve
    from components.export import figure_html

    require_chromium()
    fig = faithfulness_curve([{"n": 0, "faithfulness": 0.0}, {"n": 10, "faithfulness": 0.8}], 10, [0.0])
    path = tmp_path / "curve.html"
    path.write_text(figure_html(fig, "IOI <curve>", {"model": "smollm2", "cn": "10"}, "notes & more"))
    requests: list[str] = []
    with chromium_page() as page:
        page.route("**/*", lambda route: (requests.append(route.request.url), route.abort())
                   if not route.request.url.startswith("file:") else route.continue_())
        page.goto(path.as_uri())
        page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
        expect(page.locator("h1")).to_have_text("IOI <curve>")
        expect(page.get_by_text("notes & more")).to_be_visible()
        assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2
    assert requests == []  # nothing fetched from the network


def test_three_sessions_a_simple_page_during_a_long_graph_and_cancel(app_url):
    """Three users at once: each sees its own prompt's prediction; while one computes a large
    graph, another still gets the gallery page; cancelling leaves the shared model clean."""
    cases = {"The capital of France is": "␣Paris", IOI_PROMPT: "␣Mary", "The Eiffel Tower is in the city of": "␣Paris"}
    with chromium_pages(3) as (first, second, third):
        for page, prompt in zip((first, second, third), cases):
            page.goto(f"{app_url}/inspector?prompt={quote(prompt)}")
        for page, expected in zip((first, second, third), cases.values()):
            expect(metric(page, "Target")).to_have_text(expected, timeout=180_000)

        first.goto(f"{app_url}/graph?prompt={quote('The capital of France is')}&k=1500")
        cancel = first.get_by_role("button", name="Cancel")
        cancel.wait_for(timeout=120_000)
        second.goto(f"{app_url}/gallery")
        second.get_by_role("heading", name="Gallery").wait_for(timeout=30_000)  # answered during the graph
        expect(first.get_by_role("progressbar")).to_be_visible()  # still computing

        cancel.click()
        first.get_by_text("Cancelled.").wait_for(timeout=120_000)
        third.goto(f"{app_url}/inspector?prompt={quote(IOI_PROMPT)}")
        expect(metric(third, "Target")).to_have_text("␣Mary", timeout=60_000)


PAGES = {"": "Circuitscope", "inspector": "Prompt inspector", "heatmaps": "Heatmaps and logit lens",
         "graph": "Attribution graph", "patching": "Patching", "circuit": "Circuit (heads and MLPs)",
         "paths": "Influential neuron path", "units": "Neurons across a corpus",
         "attention": "Attention: routes and QK", "gallery": "Gallery"}


def test_every_page_opens_at_its_own_path(app_url):
    """Deep links: /inspector used to open a "Page not found" dialog (it was the default page)."""
    not_found = []
    with chromium_page() as page:
        for path, title in PAGES.items():
            page.goto(f"{app_url}/{path}?prompt=The+capital+of+France+is&methods=atp&k=20&steps=2")
            page.get_by_role("heading", name=title).first.wait_for(timeout=180_000)
            if page.get_by_text("Page not found").count():
                not_found.append(path)
    assert not_found == []


def test_a_new_prompt_frames_the_grid_then_draws_it(app_url):
    """The heatmap of a prompt not computed yet: the grid's frame (axes, labels) is in the page
    before the grid, and only the grid stays (views.common.figure_frame)."""
    with chromium_page(height=1400) as page:
        page.add_init_script("""window.framed = false; new MutationObserver(() => {
            if (document.querySelector("[class*='st-key-frame_heatmap']")) window.framed = true;
        }).observe(document, {subtree: true, childList: true});""")
        page.goto(f"{app_url}/heatmaps?prompt=The+ocean+is+deep+and+the+sky+is")
        page.locator(RESULT).first.wait_for(timeout=180_000)
        wait_until_idle(page)
        assert page.evaluate("() => window.framed")
        expect(page.locator("[class*='st-key-frame_']")).to_have_count(0)
        expect(page.locator("[class*='st-key-heatmap_grid'] .main-svg").first).to_be_visible()


def test_patching_draws_the_approximations_first_and_cancel_leaves_the_model_clean(app_url):
    with chromium_page(height=1400) as page:
        started = time.perf_counter()
        page.goto(f"{app_url}/patching?prompt={quote(IOI_PROMPT)}")
        result = page.locator("[data-testid='stPlotlyChart']:not([class*='st-key-frame_'] *)")  # not its frame
        result.filter(has_text="AtP: Residual stream").first.wait_for(timeout=180_000)
        first_figure = time.perf_counter() - started
        page.get_by_text("Exact:").first.wait_for(timeout=120_000)  # the exact grid, filling in
        page.get_by_role("button", name="Cancel").click()
        page.get_by_text("Cancelled.").wait_for(timeout=120_000)
        page.goto(f"{app_url}/inspector?prompt={quote(IOI_PROMPT)}")
        expect(metric(page, "Target")).to_have_text("␣Mary", timeout=60_000)
    assert first_figure < 60  # generous; bench/ records the real figure


def test_a_graph_node_opens_its_neuron_dashboard_and_an_example_becomes_the_prompt(smollm2_index, app_url, tmp_path):
    url = f"{app_url}/graph?prompt=The+capital+of+France+is&target=+Paris&k=60"
    with chromium_page(height=1600) as page:
        page.goto(url)
        page.get_by_text("Nodes shown").wait_for(timeout=180_000)
        wait_until_idle(page)
        page.locator("[data-testid='stPlotlyChart'] path.point").first.wait_for(timeout=60_000)
        neuron_trace = page.evaluate(  # index of the "neuron" trace among the plot's traces
            "() => document.querySelector('.js-plotly-plot').data.findIndex(t => t.name === 'neuron')")
        assert neuron_trace >= 0
        page.locator(".js-plotly-plot .scatterlayer .trace").nth(neuron_trace).locator("path.point").first.click(
            force=True)
        page.get_by_text("Neuron dashboard").first.wait_for(timeout=60_000)
        wait_until_idle(page)
        expect(page.get_by_text("Top examples")).to_be_visible()
        expect(page.get_by_text("Density (act > 0)")).to_be_visible()
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        load = page.get_by_role("button", name="Load as prompt", exact=True).first
        load.scroll_into_view_if_needed()
        load.click()
        page.wait_for_function("() => !window.location.search.includes('France')", timeout=60_000)
        box = page.get_by_role("textbox", name="Prompt", exact=True)
        expect(box).not_to_have_value(re.compile("capital of France"), timeout=60_000)
        assert box.input_value().strip()
        # the graph of the loaded example (a long document) is not what is tested: leaving
        # the page stops it at its next progress report instead of waiting a minute for it
        page.locator("[data-testid='stSidebarNavLink'][href$='/gallery']").first.click()
        page.get_by_role("heading", name="Gallery").first.wait_for(timeout=60_000)
        wait_until_idle(page)


def test_from_patching_to_circuit_by_the_sidebar_while_exact_patching_runs(app_url):
    """A user leaves the patching page while its exact grid streams: the circuit page opens
    with a usable pair and draws its circuit (before: an empty corrupted prompt and a
    traceback, so nothing was ever drawn)."""
    with chromium_page(height=1200) as page:
        page.goto(f"{app_url}/gallery?prompt=The+capital+of+Italy+is")
        page.locator("h1").first.wait_for(timeout=180_000)
        page.locator("[data-testid='stSidebarNavLink'][href$='/patching']").first.click()
        page.locator(RESULT).first.wait_for(timeout=180_000)  # AtP drawn; the exact grid is streaming
        page.wait_for_timeout(1500)
        page.locator("[data-testid='stSidebarNavLink'][href$='/circuit']").first.click()
        page.get_by_role("heading", name="Circuit (heads and MLPs)").wait_for(timeout=60_000)
        page.locator(RESULT).first.wait_for(timeout=120_000)
        expect(page.get_by_role("textbox", name="Corrupted prompt (same token length as the prompt in the sidebar)")
               ).not_to_have_value("")
        expect(page.locator("[data-testid='stException']")).to_have_count(0)
