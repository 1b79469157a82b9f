"""Drives the plugin the way a user sees it: a real `tensorboard` and headless Chromium.

Test code, not shipped: used by `tests/test_plugin_browser.py`,
`benchmarks/plugin_scale.py` and to make `docs/images/dashboard.png`. Standard library only: Chromium is driven
over the DevTools protocol through `--remote-debugging-pipe` (JSON messages
ended by NUL bytes on file descriptors 3 and 4), so no websocket client is
needed. The plugin itself never imports this module.

Example:

```python
with start_tensorboard("logs") as url, Chromium() as browser:
    page = browser.open(url + "#keras_vg")
    browser.wait_for(page, "document.title !== ''")
    browser.screenshot(page, "dashboard.png")
```
"""

import base64
import contextlib
import fcntl
import importlib.metadata
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

CHROMIUM = os.environ.get("KERAS_VG_CHROMIUM", "/usr/bin/chromium")
ENTRY_POINT = "keras_vg = tb_plugin.loader:GradientsPluginLoader"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_demo_run(log_dir, names, steps=60, spike=(23, 2), nan=(37, 4), layers=None, dead=None,
                   alert=False):
    """Writes a small synthetic run with `keras_vg.event_writer.EventWriter`.

    Gradient norms grow from 1e-6 (input side, vanishing) to 1 (output side);
    one variable spikes to 1e4 at one step and one is NaN at one step;
    clipping turns on at step 10, off at 20, and step `nan[0]` is skipped.
    Weight norms differ per variable and update ratios per variable and
    step, so that combining them per layer is not trivial.

    Args:
        log_dir: The run directory.
        names: Variable paths, input first.
        steps: Recorded steps `0 .. steps-1`. Defaults to `60`.
        spike: `(step, variable index)` of the spike. Defaults to `(23, 2)`.
        nan: `(step, variable index)` of the NaN. Defaults to `(37, 4)`.
        layers: The layer of each variable, or None. When given, a model
            summary names each layer's variables (as `GradientMonitor`
            writes it) and each layer records a `dead_fraction` of 0.05.
            Defaults to `None`.
        dead: `(layer index, first step)`: that layer's dead fraction is
            0.95 from that step on (a dead region), or None. Needs
            `layers`. Defaults to `None`.
        alert: Whether to record an `alert` event at the spike, as the
            monitor does for what it finds while training. Defaults to
            `False`.
    """
    import numpy as np

    from keras_vg import format as fmt
    from keras_vg.event_writer import EventWriter

    writer = EventWriter(log_dir)
    rng = np.random.default_rng(0)
    layer_names = list(dict.fromkeys(layers)) if layers is not None else []
    if layers is not None:
        writer.write_json(fmt.MODEL_NAME, 0, {"name": "demo", "layers": [
            {"name": layer, "class": "Dense", "activation": "relu", "kernel_initializer": "GlorotUniform",
             "variables": [n for n, owner in zip(names, layers) if owner == layer]}
            for layer in layer_names]})
    weight_norm = np.linspace(0.5, 3.0, len(names))
    for step in range(steps):
        grad = np.logspace(-6, 0, len(names)) * (1 + 0.1 * rng.random(len(names)))
        if step == spike[0]:
            grad[spike[1]] = 1e4
        if step == nan[0]:
            grad[nan[1]] = np.nan
        writer.write_stat("grad_norm", step, grad, names)
        writer.write_stat("weight_norm", step, weight_norm, names)
        ratio = 1e-3 * (1 + rng.random(len(names)))
        if step == 0:
            ratio[1] = np.nan  # zero-initialised weights: undefined, not broken
        writer.write_stat("update_ratio", step, ratio, names)
        writer.write_stat("global_grad_norm", step, float(np.nansum(grad)))
        if layers is not None:
            fraction = np.full(len(layer_names), 0.05)
            if dead is not None and step >= dead[1]:
                fraction[dead[0]] = 0.95
            writer.write_stat("dead_fraction", step, fraction, layer_names)
    events = [(10, "clip_on"), (20, "clip_off"), (nan[0], "skip")]
    if alert:
        events.append((spike[0], "alert"))
    for step, kind in events:
        if step < steps:
            writer.write_json(fmt.EVENTS_NAME, step, [{"kind": kind, "step": step, "message": kind}])
    writer.close()


def entry_point_installed():
    """True if an installed distribution declares our `tensorboard_plugins` entry point."""
    return any(
        ep.value == ENTRY_POINT.split(" = ")[1]
        for ep in importlib.metadata.entry_points(group="tensorboard_plugins")
    )


@contextlib.contextmanager
def plugin_environment():
    """Yields environment variables under which `tensorboard` finds the plugin.

    With the package installed (`pip install -e .`) that is the current
    environment. Otherwise a throw-away `.dist-info` declaring the entry point
    is put on `PYTHONPATH`, with the repository, for development before
    `pyproject.toml` exists.

    Yields:
        `(env, installed)`: a dict for `subprocess`, and whether the real
        installed entry point is used.
    """
    env = dict(os.environ)
    if entry_point_installed():
        yield env, True
        return
    with tempfile.TemporaryDirectory(prefix="kvg-entry-") as directory:
        info = os.path.join(directory, "keras_vg_tb_plugin_dev-0.0.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as handle:
            handle.write("Metadata-Version: 2.1\nName: keras-vg-tb-plugin-dev\nVersion: 0.0\n")
        with open(os.path.join(info, "entry_points.txt"), "w") as handle:
            handle.write(f"[tensorboard_plugins]\n{ENTRY_POINT}\n")
        paths = [directory, REPO_ROOT, env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        yield env, False


@contextlib.contextmanager
def start_tensorboard(logdir, samples_per_plugin="keras_vg=0", env=None, timeout=60, load_fast="false"):
    """Runs the `tensorboard` program on a free port of 127.0.0.1.

    Args:
        logdir: Passed as `--logdir`.
        samples_per_plugin: Passed as `--samples_per_plugin`, or None.
            Defaults to `"keras_vg=0"` (keep every record).
        env: Environment for the process (see `plugin_environment`).
            Defaults to the current one.
        timeout: Seconds to wait for the server to listen. Defaults to `60`.
        load_fast: `"false"` for the Python loader, `"true"` for the Rust
            data server. Defaults to `"false"`.

    Yields:
        The base URL, e.g. `"http://127.0.0.1:41234/"`.
    """
    args = [
        sys.executable, "-m", "tensorboard.main", "--logdir", os.fspath(logdir),
        "--host", "127.0.0.1", "--port", "0", "--load_fast", load_fast, "--reload_interval", "2",
    ]
    if samples_per_plugin:
        args += ["--samples_per_plugin", samples_per_plugin]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    found = queue.Queue()

    def pump():
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if match:
                found.put(match.group(1))

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            url = found.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError("tensorboard did not start:\n" + "".join(lines[-40:])) from None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get_json(url, timeout=30):
    """GETs a URL and parses its JSON."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def wait_until(predicate, timeout=60, interval=0.25, what="condition"):
    """Polls `predicate()` until it returns a true value, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {timeout}s waiting for {what}.")
        time.sleep(interval)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe.

    Args:
        width: Viewport width in CSS pixels. Defaults to `1400`.
        height: Viewport height in CSS pixels. Defaults to `1000`.
        binary: Path of the browser. Defaults to `/usr/bin/chromium`.

    Attributes:
        events: Every protocol event received, as dicts (`method`, `params`,
            `sessionId`), e.g. `Page.javascriptDialogOpening`.
    """

    def __init__(self, width=1400, height=1000, binary=CHROMIUM):
        self.width, self.height = width, height
        self._profile = tempfile.mkdtemp(prefix="kvg-chromium-")
        to_child_read, self._to_child = os.pipe()
        self._from_child, from_child_write = os.pipe()

        def wire_pipes():
            # DevTools reads commands from fd 3 and writes answers to fd 4.
            read_end = fcntl.fcntl(to_child_read, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_child_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._process = subprocess.Popen(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank",
            ],
            preexec_fn=wire_pipes, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child_read)
        os.close(from_child_write)
        self._ids = itertools.count(1)
        self._answers = {}
        self._cond = threading.Condition()
        self.events = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buffer = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, method, params=None, session=None, timeout=60):
        """Sends one command and returns its `result`; raises on a protocol error."""
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode("utf-8") + b"\0")
        with self._cond:
            ok = self._cond.wait_for(
                lambda: ident in self._answers or getattr(self, "_closed", False), timeout=timeout
            )
            answer = self._answers.pop(ident, None)
        if not ok or answer is None:
            raise TimeoutError(f"Chromium did not answer {method} within {timeout}s.")
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def open(self, url):
        """Opens `url` in a new page and returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Runtime.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False,
        }, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate(self, session, expression):
        """Evaluates JavaScript in the page (awaiting promises) and returns its JSON value."""
        result = self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        }, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, session, expression, timeout=60):
        """Polls a JavaScript expression until it is truthy; returns its value."""
        return wait_until(lambda: self.evaluate(session, expression), timeout=timeout, what=expression)

    def screenshot(self, session, path):
        """Saves a PNG of the whole page to `path`."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=session)["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def close(self):
        """Stops the browser and removes its profile."""
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=10)
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Reading the Gradients tab from outside the page: the page keeps no test hooks,
# so these evaluate DevTools expressions against its DOM and canvases after it drew.

FRAME = "document.querySelector('iframe') && document.querySelector('iframe').contentDocument"


def in_frame(body):
    """JavaScript evaluating `body` (which may use `d`, the plugin's document) inside the tab's iframe."""
    return f"(() => {{ const d = {FRAME}; if (!d || !d.body) return null; {body} }})()"


def heatmap_geometry(browser, page, panel=0, rows=1):
    """Where a panel's heatmap cells are, by the page's own exported `layout`.

    Args:
        browser: A `Chromium`.
        page: Its session.
        panel: Which panel (0: the first run).
        rows: The heatmap's number of rows.

    Returns:
        A dict: `x0`, `y0`, `w`, `rowPx` (canvas CSS pixels) and `left`,
        `top` (the canvas' corner in the top page's CSS pixels).
    """
    return browser.evaluate(page, f"""(async () => {{
        const frame = document.querySelector('iframe');
        const d = frame.contentDocument;
        const canvas = d.querySelectorAll('.kvg-heatmap')[{panel}];
        // The module the page draws with, imported here: a pure function of the width and rows.
        const {{layout}} = await import(new URL('static/heatmap.js', d.baseURI).href);
        const g = layout(canvas.parentElement.clientWidth, {rows});
        const f = frame.getBoundingClientRect(), c = canvas.getBoundingClientRect();
        return {{x0: g.x0, y0: g.y0, w: g.w, rowPx: g.rowPx, left: f.left + c.left, top: f.top + c.top}};
    }})()""")


def cell_point(geometry, row, column, columns):
    """The top page's CSS pixel at the centre of a heatmap cell, for `Input.dispatchMouseEvent`."""
    return (geometry["left"] + geometry["x0"] + (column + 0.5) / columns * geometry["w"],
            geometry["top"] + geometry["y0"] + (row + 0.5) * geometry["rowPx"])


def heatmap_cells(browser, page, geometry, cells, columns, panel=0, inset=3):
    """Reads heatmap cells' pixels from the canvas.

    Args:
        geometry: From `heatmap_geometry`.
        cells: `(row, column)` pairs.
        columns: The heatmap's number of columns.
        inset: CSS pixels left out at each cell edge (selection lines, outlines).

    Returns:
        One `(r, g, b, marked)` per cell: the median colour of its pixels,
        and the fraction of them far (> 60 in some channel) from that median,
        which is 0 for a plain cell and well above for a patterned one.
    """
    return browser.evaluate(page, in_frame(f"""
        const canvas = d.querySelectorAll('.kvg-heatmap')[{panel}];
        const g = {json.dumps(geometry)}, dpr = canvas.width / canvas.clientWidth, cw = g.w / {columns};
        const median = (a) => a.slice().sort((x, y) => x - y)[a.length >> 1];
        return {json.dumps(list(cells))}.map(([row, column]) => {{
            const x = Math.ceil((g.x0 + column * cw + {inset}) * dpr);
            const y = Math.ceil((g.y0 + row * g.rowPx + {inset}) * dpr);
            const w = Math.max(1, Math.floor((cw - 2 * {inset}) * dpr));
            const h = Math.max(1, Math.floor((g.rowPx - 2 * {inset}) * dpr));
            const data = canvas.getContext('2d').getImageData(x, y, w, h).data;
            const channels = [0, 1, 2].map((k) => median(Array.from({{length: w * h}}, (_, i) => data[4 * i + k])));
            let far = 0;
            for (let i = 0; i < w * h; i++) {{
                if ([0, 1, 2].some((k) => Math.abs(data[4 * i + k] - channels[k]) > 60)) far++;
            }}
            return [...channels, far / (w * h)];
        }});"""))


def drawn_pixels(browser, page, geometry, rows, panel=0):
    """How many pixels of a panel's cell area differ from the white background."""
    return browser.evaluate(page, in_frame(f"""
        const canvas = d.querySelectorAll('.kvg-heatmap')[{panel}];
        const g = {json.dumps(geometry)}, dpr = canvas.width / canvas.clientWidth;
        const data = canvas.getContext('2d').getImageData(Math.round(g.x0 * dpr), Math.round(g.y0 * dpr),
            Math.round(g.w * dpr), Math.round({rows} * g.rowPx * dpr)).data;
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {{
            if (data[i] !== 255 || data[i + 1] !== 255 || data[i + 2] !== 255) count++;
        }}
        return count;"""))
