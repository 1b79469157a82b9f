"""How the Gradients tab copes with a big run: 1,000 variables x 20,000 recorded steps.

Writes the run with `keras_vg.event_writer.EventWriter` (grad norm, update
ratio, the global norm, a few events), starts the real `tensorboard` program
(Python loader, `--samples_per_plugin=keras_vg=0`), waits until it has loaded
everything, then measures:

- the `/heatmap` route: the first answer once TensorBoard has loaded the
  run (the plugin's background thread has stacked TensorBoard's tensors and
  run the region rules by then) and later answers (median of 5), with the
  payload size as sent plain and gzipped;
- the same route after `--append` more steps are written while TensorBoard
  runs: asked the moment `/runs` lists them (the request may wait for the
  preparation under way), and asked a few seconds later;
- the page in headless Chromium: from `render()` to the heatmap drawn
  (`data-render-ms`: fetch, decode and draw) and the drawing alone;
- for comparison, in this process over TensorBoard's own data provider with
  no background thread: the cold heatmap answer (stack every series, run the
  rules), and the answer after `--append` more steps (only those are stacked;
  the rules run again over the whole run).

Targets: heatmap route < 0.5 s once loaded, payload < 2 MB, page render < 1 s.

Usage:

    .venv/bin/python benchmarks/plugin_scale.py [--variables 1000] [--steps 20000] [--append 500] [--logdir DIR]

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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]  # the browser driver is test code

import tensorboard_browser as testing  # noqa: E402

from keras_vg.event_writer import EventWriter  # noqa: E402

FRAME = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"


def variable_names(variables):
    return [f"block_{i // 2:03d}/dense/{'kernel' if i % 2 == 0 else 'bias'}" for i in range(variables)]


def write_run(log_dir, variables, steps, first=0):
    """A deep run: early layers vanish, one spike, one NaN, clipping events.

    Args:
        log_dir: The run directory.
        variables: Number of variables.
        steps: Number of steps to write.
        first: The first step: a later call appends to the run (in a new file).
    """
    names = variable_names(variables)
    writer = EventWriter(log_dir, flush_secs=120)
    rng = np.random.default_rng(first)
    depth_scale = np.logspace(-8, 0, variables).astype(np.float32)
    noise = np.exp(rng.normal(0, 0.3, size=(256, variables))).astype(np.float32)
    ratio = np.full(variables, 1e-3, np.float32)
    for index in range(steps):
        step = first + index
        grad = depth_scale * noise[step % 256]
        if index == steps // 3:
            grad[variables // 2] = 1e5  # a one-step explosion that must survive downsampling
        if index == 2 * steps // 3:
            grad[variables - 3] = np.nan
        writer.write_stat("grad_norm", step, grad, names)
        writer.write_stat("update_ratio", step, ratio, names)
        writer.write_stat("global_grad_norm", step, float(np.nansum(grad)))
        if first == 0 and index in (steps // 4, steps // 2):
            kind = "clip_on" if index == steps // 4 else "clip_off"
            writer.write_json("events", step, [{"kind": kind, "step": step, "message": kind}])
    writer.close()
    return names


def max_step(base):
    runs = testing.get_json(base + "runs")["runs"]
    return runs[0]["max_step"] if runs else -1


def appended_answer(base, run_dir, variables, count, pause, columns):
    """Appends `count` steps; once `/runs` lists them, waits `pause` s and times a heatmap answer."""
    first = max_step(base) + 1
    write_run(run_dir, variables, count, first=first)
    testing.wait_until(lambda: max_step(base) == first + count - 1, timeout=600, interval=0.25,
                       what="TensorBoard to load the appended steps")
    time.sleep(pause)
    elapsed, body, _ = fetch(f"{base}heatmap?run=big&stat=grad_norm&columns={columns}")
    return elapsed, json.loads(body)["num_steps"]


def in_process(root, variables, count, columns):
    """Cold answers with no background thread: (cold s, after `count` appended steps s)."""
    from tensorboard import context as context_lib
    from tensorboard.backend.event_processing import data_provider as provider_lib
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from tb_plugin.plugin import GradientsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"keras_vg": 0})
    multiplexer.AddRunsFromDirectory(root)
    multiplexer.Reload()
    provider = provider_lib.MultiplexerDataProvider(multiplexer, root)
    plugin = GradientsPlugin(base_plugin.TBContext(data_provider=provider), prepare_in_background=False)
    ctx = context_lib.RequestContext()

    def answer():
        started = time.perf_counter()
        plugin.heatmap_impl(ctx, "", "big", "grad_norm", columns)
        return time.perf_counter() - started

    cold = answer()
    first = int(max(multiplexer.Tensors("big", "keras_vg/grad_norm"), key=lambda e: e.step).step) + 1
    write_run(os.path.join(root, "big"), variables, count, first=first)
    multiplexer.AddRunsFromDirectory(root)
    multiplexer.Reload()
    return cold, answer()


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
    parser.add_argument("--append", type=int, default=500, help="steps appended while TensorBoard runs")
    parser.add_argument("--pause", type=float, default=6.0,
                        help="seconds between seeing appended steps and asking, for the second answer")
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
                r["max_step"] >= args.steps - 1 and "update_ratio" in r["stats"]
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
        rows.append(("heatmap route, first answer once loaded", f"{cold:.2f} s",
                     "prepared in the background; target < 0.5 s"))
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

        racing, racing_steps = appended_answer(base, run_dir, args.variables, args.append, 0, args.columns)
        rows.append((f"heatmap route, {args.append} steps appended, asked at once", f"{racing:.2f} s",
                     f"{racing_steps} steps; may wait for the preparation under way"))
        settled, settled_steps = appended_answer(base, run_dir, args.variables, args.append, args.pause,
                                                 args.columns)
        rows.append((f"heatmap route, {args.append} more appended, asked {args.pause:g} s later",
                     f"{settled:.2f} s", f"{settled_steps} steps"))

        first, again = measure_page(url, args.width)
        rows.append(("page: heatmap request to drawn, first visit", f"{first[0] / 1000:.2f} s",
                     "fetch + decode + draw; target < 1 s"))
        rows.append(("page: heatmap request to drawn, stat switched back", f"{again[0] / 1000:.2f} s", ""))
        rows.append(("page: drawing alone", f"{again[1] / 1000:.3f} s", f"{again[2]} pixels drawn"))

    # TensorBoard has stopped: the comparison does not share the CPU with it.
    no_thread, no_thread_appended = in_process(root, args.variables, args.append, args.columns)
    rows.append(("no background thread: first answer (stack + rules)", f"{no_thread:.2f} s", "in process"))
    rows.append((f"no background thread: after {args.append} steps appended", f"{no_thread_appended:.2f} s",
                 "stacks the new steps only; rules over the whole run"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>10}  note")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 30}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    missed = max(cold, settled, statistics.median(warm)) >= 0.5 or len(body) >= 2e6 or again[0] >= 1000
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
