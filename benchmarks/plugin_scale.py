"""How the Gradients tab copes with a big run: 1,000 variables x 20,000 recorded steps.

Writes the run with `keras_vg.event_writer.EventWriter` (grad norm, update
ratio, the global norm, a few events), starts the real `tensorboard` program
(Python loader, `--samples_per_plugin=keras_vg=0`), waits until it has loaded
everything, then measures:

- the `/heatmap` route: the first answer after loading (which stacks
  TensorBoard's tensors and runs the region rules, once per new data) and
  later answers (median of 5), with the payload size as sent plain and gzipped;
- the page in headless Chromium: from `render()` to the heatmap drawn
  (`data-render-ms`: fetch, decode and draw) and the drawing alone.

Targets: heatmap route < 0.5 s once loaded, payload < 2 MB, page render < 1 s.

Usage:

    .venv/bin/python benchmarks/plugin_scale.py [--variables 1000] [--steps 20000] [--logdir DIR]

It prints a table; the exit status is 1 when a target is missed.
"""

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vg.event_writer import EventWriter  # noqa: E402
from tb_plugin import testing  # noqa: E402

FRAME = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"


def write_run(log_dir, variables, steps):
    """A deep run: early layers vanish, one spike, one NaN, clipping events."""
    names = [f"block_{i // 2:03d}/dense/{'kernel' if i % 2 == 0 else 'bias'}" for i in range(variables)]
    writer = EventWriter(log_dir, flush_secs=120)
    rng = np.random.default_rng(0)
    depth_scale = np.logspace(-8, 0, variables).astype(np.float32)
    noise = np.exp(rng.normal(0, 0.3, size=(256, variables))).astype(np.float32)
    ratio = np.full(variables, 1e-3, np.float32)
    for step in range(steps):
        grad = depth_scale * noise[step % 256]
        if step == steps // 3:
            grad[variables // 2] = 1e5  # a one-step explosion that must survive downsampling
        if step == 2 * steps // 3:
            grad[variables - 3] = np.nan
        writer.write_stat("grad_norm", step, grad, names)
        writer.write_stat("update_ratio", step, ratio, names)
        writer.write_stat("global_grad_norm", step, float(np.nansum(grad)))
        if step in (steps // 4, steps // 2):
            kind = "clip_on" if step == steps // 4 else "clip_off"
            writer.write_json("events", step, [{"kind": kind, "step": step, "message": kind}])
    writer.close()
    return names


def fetch(url, gzip_ok=False):
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip_ok else {})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        body = response.read()
        encoding = response.headers.get("Content-Encoding")
    elapsed = time.perf_counter() - started
    return elapsed, body, encoding


def measure_page(url, width):
    """Opens the tab; returns (render ms, draw ms, drawn pixels, warm render ms)."""
    def in_frame(body):
        return f"(() => {{ const d = {FRAME}; if (!d || !d.body) return null; {body} }})()"

    drawn = in_frame(
        "const p = d.querySelector('.kvg-panel'), c = d.querySelector('.kvg-heatmap');"
        "return p && ['drawn', 'complete'].includes(p.dataset.state)"
        " ? [Number(p.dataset.renderMs), Number(c.dataset.drawMs), Number(c.dataset.drawnPixels)] : null;"
    )
    complete = in_frame("const p = d.querySelector('.kvg-panel'); return p?.dataset.state === 'complete';")

    def choose_stat(stat):
        return in_frame(
            f"const s = d.querySelectorAll('.kvg-toolbar select')[2]; s.value = {json.dumps(stat)};"
            "s.dispatchEvent(new Event('change')); return true;"
        )

    with testing.Chromium(width, 1000) as browser:
        page = browser.open(url + "#keras_vg")
        first = browser.wait_for(page, drawn, timeout=600)
        # Again, with a warm server: switch the statistic away and back.
        browser.wait_for(page, complete, timeout=600)
        browser.evaluate(page, choose_stat("update_ratio"))
        browser.wait_for(page, complete, timeout=600)
        browser.evaluate(page, choose_stat("grad_norm"))
        again = browser.wait_for(page, drawn, timeout=600)
        browser.wait_for(page, complete, timeout=600)
        screenshot = os.path.join(testing.REPO_ROOT, "test-artifacts", "plugin-scale.png")
        browser.screenshot(page, screenshot)
    return first, again


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--columns", type=int, default=1000, help="columns the page asks for")
    parser.add_argument("--width", type=int, default=1400, help="browser window width")
    parser.add_argument("--logdir", help="reuse or keep the run here (default: a temporary folder)")
    args = parser.parse_args()

    root = args.logdir or tempfile.mkdtemp(prefix="kvg-scale-")
    run_dir = os.path.join(root, "big")
    rows = []
    if not os.path.isdir(run_dir):
        started = time.perf_counter()
        write_run(run_dir, args.variables, args.steps)
        rows.append(("write event files (EventWriter)", f"{time.perf_counter() - started:.1f} s", ""))
    size = sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir))
    rows.append(("event files", f"{size / 1e6:.0f} MB", f"{args.variables} x {args.steps}"))

    with testing.plugin_environment() as (env, _), testing.start_tensorboard(root, env=env) as url:
        base = url + "data/plugin/keras_vg/"
        started = time.perf_counter()
        testing.wait_until(
            lambda: all(
                r["max_step"] == args.steps - 1 and "update_ratio" in r["stats"]
                for r in testing.get_json(base + "runs")["runs"]
            ) and testing.get_json(base + "runs")["runs"],
            timeout=1800, interval=2, what="TensorBoard to load the run",
        )
        # The listing's max_step can lead the last tensors by a reload: settle.
        time.sleep(3)
        load_time = time.perf_counter() - started
        rows.append(("TensorBoard loads the run (Python loader)", f"{load_time:.0f} s", ""))

        heatmap = f"{base}heatmap?run=big&stat=grad_norm&columns={args.columns}"
        cold, body, _ = fetch(heatmap)
        warm = [fetch(heatmap)[0] for _ in range(5)]
        gz_time, gz_body, encoding = fetch(heatmap, gzip_ok=True)
        assert encoding == "gzip"
        answer = json.loads(body)
        gzip.decompress(gz_body)
        rows.append(("heatmap route, first answer (stack + rules)", f"{cold:.2f} s", ""))
        rows.append(("heatmap route, later answers (median of 5)", f"{statistics.median(warm):.3f} s",
                     "target < 0.5 s"))
        rows.append(("heatmap payload, plain JSON", f"{len(body) / 1e6:.2f} MB",
                     f"{len(answer['names'])} x {answer['columns']} cells; target < 2 MB"))
        rows.append(("heatmap payload, gzip (as browsers get it)", f"{len(gz_body) / 1e6:.2f} MB", ""))
        middle = urllib.parse.quote(answer["names"][len(answer["names"]) // 2])
        series_time = fetch(f"{base}series?run=big&stat=grad_norm&name={middle}&columns=600")[0]
        rows.append(("series route (one variable, 600 buckets)", f"{series_time:.3f} s", ""))
        classification_time = fetch(f"{base}classification?run=big")[0]
        rows.append(("classification route (cached rules)", f"{classification_time:.3f} s", ""))

        first, again = measure_page(url, args.width)
        rows.append(("page: heatmap request to drawn, first visit", f"{first[0] / 1000:.2f} s",
                     "fetch + decode + draw; target < 1 s"))
        rows.append(("page: heatmap request to drawn, stat switched back", f"{again[0] / 1000:.2f} s", ""))
        rows.append(("page: drawing alone", f"{again[1] / 1000:.3f} s", f"{again[2]} pixels drawn"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>10}  note")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 30}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    missed = statistics.median(warm) >= 0.5 or len(body) >= 2e6 or again[0] >= 1000
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
