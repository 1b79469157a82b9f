"""The Gradients tab in a real `tensorboard` program, and in headless Chromium.

TensorBoard is started as the `tensorboard` command would be, finding the
plugin through its installed `tensorboard_plugins` entry point. The browser
test (marked `browser`) opens the dashboard in Chromium and reads what the
page drew from outside (the DOM, the canvases' pixels, the tooltips); a
screenshot is saved to `test-artifacts/plugin-dashboard.png`.
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
# A run of five layers, a kernel and a bias each, named by its model summary:
# layer 3 dies from step 30 on, and the monitor recorded an alert.
LAYER_OF = [f"dense_{i}" for i in range(5) for _ in ("kernel", "bias")]
LAYER_NAMES = [f"model/{layer}/{part}" for layer, part in zip(LAYER_OF, ["kernel", "bias"] * 5)]
DEAD = (3, 30)  # (layer, first step)
STEPS = 60
ARTIFACTS = os.path.join(testing.REPO_ROOT, "test-artifacts")
in_frame = testing.in_frame


def _require_chromium():
    if os.path.exists(testing.CHROMIUM) or shutil.which("chromium"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Chromium is required in CI and was not found at {testing.CHROMIUM}.")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium).")


def wait_complete(browser, page, panels):
    browser.wait_for(page, in_frame(
        f"const p = [...d.querySelectorAll('.kvg-panel')];"
        f"return p.length === {panels} && p.every(x => x.dataset.state === 'complete');"), timeout=60)


def choose(browser, page, index, value):
    """Picks `value` in the toolbar's `index`-th select, as a user would."""
    browser.evaluate(page, in_frame(
        f"const s = d.querySelectorAll('.kvg-toolbar select')[{index}]; s.value = {json.dumps(value)};"
        "s.dispatchEvent(new Event('change')); return true;"))


def toolbar(browser, page):
    """The toolbar's choices: run, compared run, statistic and rows."""
    return browser.evaluate(page, in_frame(
        "const s = [...d.querySelectorAll('.kvg-toolbar select')].map(x => x.value);"
        "const rows = d.querySelector('.kvg-toolbar input[type=radio]:checked');"
        "return {run: s[0], compare: s[1], stat: s[2], rows: rows && rows.value};"))


def rows_shown(browser, page, panel=0):
    """The heatmap's rows as the page lists them (the curves' row selector)."""
    return browser.evaluate(page, in_frame(
        f"return [...d.querySelectorAll('.kvg-layer-select')[{panel}].options].map(o => o.textContent);"))


def mouse(browser, page, kind, point):
    """Moves (or clicks) the real mouse at a point of the top page."""
    for event in (["mouseMoved"] if kind == "move" else ["mousePressed", "mouseReleased"]):
        browser.send("Input.dispatchMouseEvent", {
            "type": event, "x": point[0], "y": point[1], "button": "left" if kind == "click" else "none",
            "clickCount": 1 if kind == "click" else 0,
        }, session=page)


def hover(browser, page, geometry, row, column, columns=STEPS):
    """Hovers a cell of the first panel; returns the tooltip's lines as a dict."""
    browser.evaluate(page, in_frame("d.querySelector('.kvg-tooltip').hidden = true; return true;"))
    mouse(browser, page, "move", testing.cell_point(geometry, row, column, columns))
    return browser.wait_for(page, in_frame(
        "const t = d.querySelector('.kvg-tooltip'); if (t.hidden) return null;"
        "return Object.fromEntries([...t.querySelectorAll('.kvg-tooltip-row')]"
        "  .map(r => [r.children[0].textContent, r.children[1].textContent]));"))


def luminance(rgb):
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


@pytest.mark.browser
def test_dashboard_draws_and_shows_untrusted_names_as_text(tmp_path):
    _require_chromium()
    testing.write_demo_run(tmp_path / "run_a", NAMES)
    testing.write_demo_run(tmp_path / "run_layers", LAYER_NAMES, spike=(23, 4), nan=(37, 6), layers=LAYER_OF,
                           dead=DEAD, alert=True)
    testing.write_demo_run(tmp_path / XSS_RUN, [XSS_NAME] + NAMES[1:])  # the newest run, without findings
    layered = read_run(tmp_path / "run_layers")

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
                # It opens on the run with findings, one row per layer.
                wait_complete(browser, page, 1)
                assert toolbar(browser, page) == {"run": "run_layers", "compare": "", "stat": "grad_norm",
                                                  "rows": "layer"}
                steps, layers, values = layered.stat("grad_norm", by="layer")
                assert rows_shown(browser, page) == layers == list(dict.fromkeys(LAYER_OF))
                geometry = testing.heatmap_geometry(browser, page, rows=len(layers))
                column = 10
                for row, layer in enumerate(layers):
                    lines = hover(browser, page, geometry, row, column)
                    assert lines["layer"] == layer and lines["step"] == str(steps[column])
                    assert lines["variables"] == ", ".join(LAYER_NAMES[2 * row:2 * row + 2])
                    shown = float(lines["gradient norm"].removeprefix("≈ "))
                    assert shown == pytest.approx(values[column, row], rel=6e-3)  # 3 digits, log16 codes
                # The colours follow the layers' values: viridis grows lighter with the value.
                cells = testing.heatmap_cells(browser, page, geometry, [(r, column) for r in range(len(layers))],
                                              STEPS)
                order = np.argsort(values[column])
                assert np.all(np.diff([luminance(cells[r]) for r in order]) > 0), (cells, values[column])

                # Per-layer dead fraction: the dead region is marked where it is, and nowhere else.
                choose(browser, page, 2, "dead_fraction")
                wait_complete(browser, page, 1)
                everywhere = [(r, c) for r in range(len(layers)) for c in range(0, STEPS, 3)]
                cells = testing.heatmap_cells(browser, page, geometry, everywhere, STEPS)
                marked = {cell for cell, pixels in zip(everywhere, cells) if pixels[3] > 0.1}
                plain = {cell for cell, pixels in zip(everywhere, cells) if pixels[3] < 0.02}
                assert marked == {(r, c) for r, c in everywhere if r == DEAD[0] and c >= DEAD[1]}
                assert marked | plain == set(everywhere)
                assert hover(browser, page, geometry, DEAD[0], 45)["class"] == "dead"
                assert hover(browser, page, geometry, DEAD[0], 15)["class"] == "healthy"
                legend = browser.evaluate(page, in_frame(
                    "return [...d.querySelectorAll('.kvg-legend-label')].map(x => x.textContent);"))
                assert legend == ["dead", "saturated", "undefined / no record"]

                # Variables are one click away, and the choices survive a reload (URL fragment).
                choose(browser, page, 2, "grad_norm")
                wait_complete(browser, page, 1)
                browser.evaluate(page, in_frame(
                    "d.querySelector('.kvg-toolbar input[value=variable]').click(); return true;"))
                wait_complete(browser, page, 1)
                assert rows_shown(browser, page) == LAYER_NAMES == layered.stat("grad_norm")[1]
                fragment = browser.evaluate(page, "location.hash")
                assert "p.keras_vg.run=run_layers" in fragment and "p.keras_vg.by=variable" in fragment
                browser.send("Page.reload", session=page)
                wait_complete(browser, page, 1)
                assert toolbar(browser, page) == {"run": "run_layers", "compare": "", "stat": "grad_norm",
                                                  "rows": "variable"}
                assert rows_shown(browser, page) == LAYER_NAMES

                choose(browser, page, 0, "run_a")
                wait_complete(browser, page, 1)
                geometry = testing.heatmap_geometry(browser, page, rows=len(NAMES))
                drawn = testing.drawn_pixels(browser, page, geometry, len(NAMES))
                assert drawn > 20000, drawn  # the whole 8 x 60 cell area, scaled to ~1000 x 128 px

                # Hover the spike, then click it: tooltip, then the profile at that step.
                lines = hover(browser, page, geometry, 2, 23)
                assert lines["variable"] == "dense_2/kernel" and lines["step"] == "23"
                assert lines["class"] == "exploding"
                mouse(browser, page, "click", testing.cell_point(geometry, 2, 23, STEPS))
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
                    " scripts: d.querySelectorAll('script').length};"))
                assert seen["heads"] == ["run_a", XSS_RUN]
                assert XSS_NAME in seen["options"]
                assert XSS_NAME in seen["alerts"]  # the vanishing episode starts at that layer
                assert seen["elements"] == 0
                assert seen["scripts"] == 1  # TensorBoard's own entry script, nothing added
                for panel in (0, 1):
                    panel_geometry = testing.heatmap_geometry(browser, page, panel, rows=len(NAMES))
                    assert testing.drawn_pixels(browser, page, panel_geometry, len(NAMES), panel) > 5000
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
    testing.write_demo_run(tmp_path / "layers", LAYER_NAMES, layers=LAYER_OF, dead=DEAD, alert=True)
    steps, names, values = read_run(tmp_path / "long").stat("grad_norm")
    _, layers, layer_values = read_run(tmp_path / "layers").stat("update_ratio", by="layer")
    with testing.plugin_environment() as (env, _):
        for hint, points in (("keras_vg=0", 150), (None, 100)):
            server = testing.start_tensorboard(tmp_path, env=env, load_fast="true", samples_per_plugin=hint)
            with server as url:
                base = url + "data/plugin/keras_vg/"
                runs = base + "runs"
                testing.wait_until(
                    lambda runs=runs: {r["run"]: r["max_step"] for r in testing.get_json(runs)["runs"]}
                    == {"long": 149, "layers": STEPS - 1},
                    what="the Rust data server to load the runs",
                )
                body = testing.get_json(base + "heatmap?run=long&stat=grad_norm&columns=1000&by=variable")
                assert body["num_steps"] == points
                assert body["retention"]["may_be_cut"] is (points == 100)
                assert body["retention"]["limit"] == (0 if hint else 100)
                if hint:
                    got = downsample.decode_log16(body["values"], (len(names), body["columns"]))
                    np.testing.assert_allclose(got, values.T, rtol=2e-3, equal_nan=True)
                    assert body["step_start"] == steps.tolist()
                    # Layer rows: the model summary and the weight norms come through gRPC too.
                    listing = testing.get_json(runs)
                    assert listing["opening"] == "layers"
                    layered = testing.get_json(base + "heatmap?run=layers&stat=update_ratio&columns=1000")
                    assert layered["names"] == layers and layered["row_variables"][0] == LAYER_NAMES[:2]
                    got = downsample.decode_log16(layered["values"], (len(layers), layered["columns"]))
                    np.testing.assert_allclose(got, layer_values.T, rtol=2e-3, equal_nan=True)
