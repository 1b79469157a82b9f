"""The Gradients tab in a real `tensorboard` program, and in headless Chromium.

TensorBoard is started as the `tensorboard` command would be, finding the
plugin through its installed `tensorboard_plugins` entry point. The browser
test (marked `browser`) opens the dashboard in Chromium and reads what the
page drew; a screenshot is saved to `test-artifacts/plugin-dashboard.png`.
It needs Debian's `chromium` (`apt-get install chromium`): without it the test
is skipped locally and fails in CI (`CI=true`). The Rust data server test
needs the `tensorboard-data-server` wheel that TensorBoard depends on.
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorboard_browser as testing

from keras_vg.reader import read_run
from tb_plugin import downsample

NAMES = [f"dense_{i}/kernel" for i in range(8)]
XSS_NAME = "<img src=x onerror=alert(1)>/kernel"
XSS_RUN = "<svg onload=alert(2)>"
ARTIFACTS = os.path.join(testing.REPO_ROOT, "test-artifacts")
FRAME = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"


def _require_chromium():
    if os.path.exists(testing.CHROMIUM) or shutil.which("chromium"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Chromium is required in CI and was not found at {testing.CHROMIUM}.")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium).")


def in_frame(body):
    """JavaScript evaluating `body` (which may use `d`, the plugin's document) inside the iframe."""
    return f"(() => {{ const d = {FRAME}; if (!d || !d.body) return null; {body} }})()"


def panel_states(browser, page):
    return browser.evaluate(page, in_frame(
        "return [...d.querySelectorAll('.kvg-panel')].map(p => p.dataset.state);"))


def wait_complete(browser, page, panels):
    browser.wait_for(page, in_frame(
        f"const p = [...d.querySelectorAll('.kvg-panel')];"
        f"return p.length === {panels} && p.every(x => x.dataset.state === 'complete');"), timeout=60)


def choose(browser, page, index, value):
    """Picks `value` in the toolbar's `index`-th select, as a user would."""
    browser.evaluate(page, in_frame(
        f"const s = d.querySelectorAll('.kvg-toolbar select')[{index}]; s.value = {json.dumps(value)};"
        "s.dispatchEvent(new Event('change')); return true;"))


def mouse(browser, page, kind, row, column):
    """Moves (or clicks) the real mouse over a heatmap cell of the first panel."""
    point = browser.evaluate(page, f"""(() => {{
        const frame = document.querySelector('iframe').getBoundingClientRect();
        const canvas = document.querySelector('iframe').contentDocument.querySelector('.kvg-heatmap');
        const box = canvas.getBoundingClientRect();
        const g = JSON.parse(canvas.dataset.geometry);
        return [frame.left + box.left + g.x0 + (({column} + 0.5) / g.columns) * g.w,
                frame.top + box.top + g.y0 + ({row} + 0.5) * g.rowPx];
    }})()""")
    for event in (["mouseMoved"] if kind == "move" else ["mousePressed", "mouseReleased"]):
        browser.send("Input.dispatchMouseEvent", {
            "type": event, "x": point[0], "y": point[1], "button": "left" if kind == "click" else "none",
            "clickCount": 1 if kind == "click" else 0,
        }, session=page)


@pytest.mark.browser
def test_dashboard_draws_and_shows_untrusted_names_as_text(tmp_path):
    _require_chromium()
    testing.write_demo_run(tmp_path / "run_a", NAMES)
    testing.write_demo_run(tmp_path / XSS_RUN, [XSS_NAME] + NAMES[1:])

    with testing.plugin_environment() as (env, installed):
        if os.environ.get("CI") == "true":
            assert installed, "keras-vg must be installed (pip install -e .) so its entry point is used"
        with testing.start_tensorboard(tmp_path, env=env) as url, testing.Chromium(1400, 1000) as browser:
            listing = testing.wait_until(
                lambda: testing.get_json(url + "data/plugins_listing").get("keras_vg", {}).get("enabled")
                and testing.get_json(url + "data/plugins_listing"),
                what="the Gradients tab to be enabled",
            )
            assert listing["keras_vg"]["tab_name"] == "Gradients"

            page = browser.open(url + "#keras_vg")
            try:
                wait_complete(browser, page, 1)
                choose(browser, page, 0, "run_a")  # runs are sorted: the HTML-named one is first
                wait_complete(browser, page, 1)
                drawn = browser.evaluate(page, in_frame(
                    "return Number(d.querySelector('.kvg-heatmap').dataset.drawnPixels);"))
                assert drawn > 20000, drawn  # the whole 8 x 60 cell area, scaled to ~1000 x 112 px

                # Hover the spike, then click it: tooltip, then the profile at that step.
                mouse(browser, page, "move", 2, 23)
                tooltip = browser.wait_for(page, in_frame(
                    "const t = d.querySelector('.kvg-tooltip'); return t.hidden ? null : t.textContent;"))
                assert "dense_2/kernel" in tooltip and "23" in tooltip and "exploding" in tooltip
                mouse(browser, page, "click", 2, 23)
                caption = browser.wait_for(page, in_frame(
                    "const c = d.querySelector('.kvg-panel figcaption').textContent;"
                    "return c.includes('step 23') ? c : null;"))
                assert "vs depth" in caption

                # Compare with the run whose names are HTML: they must show up as text only.
                choose(browser, page, 1, XSS_RUN)
                wait_complete(browser, page, 2)
                seen = browser.evaluate(page, in_frame(
                    "return {heads: [...d.querySelectorAll('.kvg-run-name')].map(h => h.textContent),"
                    " options: [...d.querySelectorAll('.kvg-layer-select option')].map(o => o.textContent),"
                    " alerts: d.querySelector('.kvg-panel:nth-child(2) .kvg-alerts').textContent,"
                    " elements: d.querySelectorAll('img, svg, iframe, object, embed').length,"
                    " scripts: d.querySelectorAll('script').length,"
                    " pixels: [...d.querySelectorAll('.kvg-heatmap')]"
                    "   .map(c => Number(c.dataset.drawnPixels))};"))
                assert seen["heads"] == ["run_a", XSS_RUN]
                assert XSS_NAME in seen["options"]
                assert XSS_NAME in seen["alerts"]  # the vanishing episode starts at that layer
                assert seen["elements"] == 0
                assert seen["scripts"] == 1  # TensorBoard's own entry script, nothing added
                assert min(seen["pixels"]) > 5000
                dialogs = [e for e in browser.events if e["method"] == "Page.javascriptDialogOpening"]
                assert dialogs == []

                # Narrower window: the ResizeObserver redraws at the new width.
                before = browser.evaluate(page, in_frame("return d.querySelector('.kvg-heatmap').width;"))
                browser.send("Emulation.setDeviceMetricsOverride", {
                    "width": 1000, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session=page)
                browser.wait_for(page, in_frame(
                    f"return d.querySelector('.kvg-heatmap').width < {before};"))
            finally:
                os.makedirs(ARTIFACTS, exist_ok=True)
                browser.screenshot(page, os.path.join(ARTIFACTS, "plugin-dashboard.png"))
            errors = [
                e for e in browser.events if e["method"] == "Runtime.exceptionThrown"
                and "keras_vg" in json.dumps(e)
            ]
            assert errors == []


def test_rust_data_server_serves_the_same_and_reports_its_retention(tmp_path):
    """`--load_fast=true`: no multiplexer, only `context.data_provider` over gRPC."""
    try:
        from tensorboard_data_server import server_binary
    except ImportError:
        server_binary = None
    if server_binary is None or server_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tensorboard-data-server is required in CI")
        pytest.skip("no tensorboard-data-server binary for this platform")
    testing.write_demo_run(tmp_path / "long", NAMES, steps=150, spike=(70, 2), nan=(90, 4))
    steps, names, values = read_run(tmp_path / "long").stat("grad_norm")
    with testing.plugin_environment() as (env, _):
        for hint, points in (("keras_vg=0", 150), (None, 100)):
            server = testing.start_tensorboard(tmp_path, env=env, load_fast="true", samples_per_plugin=hint)
            with server as url:
                base = url + "data/plugin/keras_vg/"
                runs = base + "runs"
                testing.wait_until(
                    lambda runs=runs: [r for r in testing.get_json(runs)["runs"] if r["max_step"] == 149],
                    what="the Rust data server to load the run",
                )
                body = testing.get_json(base + "heatmap?run=long&stat=grad_norm&columns=1000")
                assert body["num_steps"] == points
                assert body["retention"]["may_be_cut"] is (points == 100)
                assert body["retention"]["limit"] == (0 if hint else 100)
                if hint:
                    got = downsample.decode_log16(body["values"], (len(names), body["columns"]))
                    np.testing.assert_allclose(got, values.T, rtol=2e-3, equal_nan=True)
                    assert body["step_start"] == steps.tolist()
