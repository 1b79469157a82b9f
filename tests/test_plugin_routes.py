"""The Gradients tab's routes, through werkzeug, against TensorBoard's own data provider.

Event files are written with `keras_vg.event_writer.EventWriter` (fast), read by
a real `EventMultiplexer` + `MultiplexerDataProvider`, and served by a real
`TensorBoardWSGI`. One test (marked `fit`) serves files that the real
`GradientMonitor` wrote during `model.fit`.
"""

import base64
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorboard_browser as testing
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider as provider_lib
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test

from keras_vg import detect
from keras_vg import format as fmt
from keras_vg.event_writer import EventWriter
from keras_vg.reader import read_run
from tb_plugin import data as data_lib
from tb_plugin import downsample
from tb_plugin.plugin import GradientsPlugin

NAMES = [f"dense_{i}/kernel" for i in range(8)]
XSS_NAME = "<img src=x onerror=alert(1)>/kernel"
STEPS = 60
SPIKE = (23, 2)  # (step, variable): a one-step explosion
NAN = (37, 4)  # (step, variable): one non-finite gradient norm
PLUGIN = "/data/plugin/keras_vg"
# Log codes are rounded to 1/700 decade: half a unit is this relative error.
LOG16_RTOL = 10 ** (0.5 / downsample.LOG16_SCALE) - 1
PLUGINS = []  # closed after the module, so no background thread outlives it
# A run of five layers with a kernel and a bias each: the model summary names
# them, layer 3 dies from step 30 on, and the monitor recorded an alert.
LAYERS = [f"dense_{i}" for i in range(5)]
LAYER_NAMES = [f"model/{layer}/{part}" for layer in LAYERS for part in ("kernel", "bias")]
LAYER_OF = [layer for layer in LAYERS for _ in ("kernel", "bias")]
DEAD = (3, 30)  # (layer, first step)
LAYER_SPIKE = (23, 4)  # dense_2's kernel
LAYER_NAN = (37, 6)  # dense_3's kernel
# Class names, most serious first: what docs/DETECTION.md says wins a cell.
SERIOUSNESS = ("nonfinite", "exploding", "vanishing", "dead", "saturated", "healthy")


def write_run(log_dir, names=NAMES):
    """A run whose first layers vanish, with one spike, one NaN and clipping events."""
    testing.write_demo_run(log_dir, names, steps=STEPS, spike=SPIKE, nan=NAN)


def make_client(logdir, sampling_hints=None, keep_all=True):
    """A werkzeug client over a real data provider, loaded as TensorBoard would."""
    guidance = {fmt.PLUGIN_NAME: 0} if keep_all else {}
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance={"tensors": 10}, tensor_size_guidance=guidance
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = provider_lib.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(
        logdir=str(logdir), data_provider=provider, sampling_hints=sampling_hints
    )
    plugin = GradientsPlugin(context)
    PLUGINS.append(plugin)
    app = application.TensorBoardWSGI([plugin], data_provider=provider)
    return werkzeug_test.Client(app)


@pytest.fixture(scope="module", autouse=True)
def _close_plugins():
    yield
    while PLUGINS:
        assert PLUGINS.pop().close()


def get(client, route, **params):
    response = client.get(PLUGIN + route, query_string=params)
    return response.status_code, json.loads(response.get_data(as_text=True))


def heatmap_values(body):
    return downsample.decode_log16(body["values"], (len(body["names"]), body["columns"]))


def bucket_max(steps, values, body, nan_wins=True):
    """What a downsampled heatmap must show: per bucket the max, with NaN winning (or skipped)."""
    columns = []
    for start, end in zip(body["step_start"], body["step_end"], strict=True):
        bucket = values[(steps >= start) & (steps <= end)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN buckets
            high = np.nanmax(bucket, axis=0)
        columns.append(np.where(np.isnan(bucket).any(axis=0), np.nan, high) if nan_wins else high)
    return np.stack(columns, axis=1)


def heatmap_classes(body):
    """Decodes the region codes, whichever of the two encodings the server chose."""
    shape = (len(body["names"]), body["columns"])
    if "bytes" in body["classes"]:
        return np.frombuffer(base64.b64decode(body["classes"]["bytes"]), dtype=np.int8).reshape(shape)
    classes = np.zeros(shape, np.int8)
    for row, first, last, code in np.reshape(body["classes"]["runs"], (-1, 4)):
        classes[row, first:last + 1] = code
    return classes


def worst_per_layer(codes, layer_of, layers):
    """Each layer's class at each step, by a loop over its variables' classes: `[T, L]`."""
    out = np.zeros((codes.shape[0], len(layers)), np.int8)
    for t in range(codes.shape[0]):
        for j, layer in enumerate(layers):
            names = [detect.CLASS_NAMES[c] for c, owner in zip(codes[t], layer_of) if owner == layer]
            out[t, j] = detect.CLASS_NAMES.index(min(names, key=SERIOUSNESS.index))
    return out


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    write_run(root / "run_a")
    testing.write_demo_run(root / "run_layers", LAYER_NAMES, steps=STEPS, spike=LAYER_SPIKE, nan=LAYER_NAN,
                           layers=LAYER_OF, dead=DEAD, alert=True)
    write_run(root / "run_xss", names=[XSS_NAME] + NAMES[1:])
    return root


@pytest.fixture(scope="module")
def client(logdir):
    return make_client(logdir)


def test_runs_lists_runs_and_statistics(client):
    code, body = get(client, "/runs")
    assert code == 200
    assert [r["run"] for r in body["runs"]] == ["run_a", "run_layers", "run_xss"]
    run = body["runs"][0]
    assert run["stats"] == ["grad_norm", "weight_norm", "update_ratio", "global_grad_norm"]
    assert run["heatmap_stats"] == ["grad_norm", "weight_norm", "update_ratio"]
    assert run["has_events"] and run["max_step"] == STEPS - 1 and run["error"] is None
    assert [r["findings"] for r in body["runs"]] == [0, 1, 0]  # the alert recorded in run_layers
    # It opens on the run with findings, although run_xss was written after it.
    assert body["runs"][2]["wall_time"] > body["runs"][1]["wall_time"]
    assert body["opening"] == "run_layers"


def test_without_findings_the_page_opens_on_the_newest_run(tmp_path):
    for name in ("old", "new", "middle"):
        write_run(tmp_path / name)
    _, body = get(make_client(tmp_path), "/runs")
    assert [r["findings"] for r in body["runs"]] == [0, 0, 0]
    assert body["opening"] == "middle"


def test_plugins_listing_enables_the_tab(client):
    response = client.get("/data/plugins_listing")
    listing = json.loads(response.get_data(as_text=True))[fmt.PLUGIN_NAME]
    assert listing["enabled"] is True
    assert listing["tab_name"] == "Gradients"
    assert listing["loading_mechanism"]["module_path"] == f"{PLUGIN}/static/index.js"


def test_heatmap_equals_reader_when_every_step_fits(client, logdir):
    code, body = get(client, "/heatmap", run="run_a", stat="grad_norm", columns=1000, by="variable")
    assert code == 200 and body["downsampled"] is False and body["columns"] == STEPS
    assert body["rows"] == "variable" and body["row_variables"] is None
    steps, names, values = read_run(logdir / "run_a").stat("grad_norm")
    assert body["names"] == names and body["step_start"] == steps.tolist() == body["step_end"]
    np.testing.assert_allclose(heatmap_values(body), values.T, rtol=LOG16_RTOL, equal_nan=True)
    assert np.isnan(heatmap_values(body)[NAN[1], NAN[0]])


@pytest.mark.parametrize("stat", ["grad_norm", "weight_norm", "update_ratio"])
def test_layer_rows_equal_the_readers_per_layer_values(client, logdir, stat):
    code, body = get(client, "/heatmap", run="run_layers", stat=stat, columns=1000)  # layers: the default
    assert code == 200 and body["rows"] == "layer"
    steps, names, values = read_run(logdir / "run_layers").stat(stat, by="layer")
    assert body["names"] == names == LAYERS and body["step_start"] == steps.tolist()
    assert body["row_variables"] == [LAYER_NAMES[2 * i:2 * i + 2] for i in range(len(LAYERS))]
    np.testing.assert_allclose(heatmap_values(body), values.T, rtol=LOG16_RTOL, equal_nan=True)
    assert body["nan_is_absent"] is (stat == "update_ratio") and body["scale"] == "log"


def test_a_layers_class_is_the_most_serious_of_its_variables(client, logdir):
    run = read_run(logdir / "run_layers")
    expected = detect.classify({s: run.stat(s) for s in run.stats()})
    _, body = get(client, "/heatmap", run="run_layers", stat="grad_norm", columns=1000)
    classes = heatmap_classes(body)
    np.testing.assert_array_equal(classes, worst_per_layer(expected.codes, LAYER_OF, LAYERS).T)
    assert classes[LAYER_SPIKE[1] // 2, LAYER_SPIKE[0]] == detect.EXPLODING
    # The layer's norm leaves its NaN variable out, but its class still says so.
    assert np.isfinite(heatmap_values(body)[LAYER_NAN[1] // 2, LAYER_NAN[0]])
    assert classes[LAYER_NAN[1] // 2, LAYER_NAN[0]] == detect.NONFINITE
    assert classes[0, 0] == detect.VANISHING
    # Downsampled, the most serious class of a bucket wins, and the spike keeps its value.
    _, small = get(client, "/heatmap", run="run_layers", stat="grad_norm", columns=2)
    assert heatmap_classes(small)[LAYER_NAN[1] // 2, 1] == detect.NONFINITE
    assert heatmap_classes(small)[LAYER_SPIKE[1] // 2, 0] == detect.EXPLODING
    assert heatmap_values(small)[LAYER_SPIKE[1] // 2, 0] == pytest.approx(1e4, rel=1e-2)
    assert small["precedence"] == [detect.CLASS_NAMES.index(name) for name in SERIOUSNESS]
    assert [small["regions"][code] for code in small["marked"]] == ["nonfinite", "exploding", "vanishing"]


def test_a_dead_region_is_marked_on_the_layers_it_covers(client, logdir):
    code, body = get(client, "/heatmap", run="run_layers", stat="dead_fraction", columns=1000, by="variable")
    assert code == 200 and body["rows"] == "layer" and body["names"] == LAYERS  # per layer either way
    classes = heatmap_classes(body)
    dead = np.zeros_like(classes)
    dead[DEAD[0], DEAD[1]:] = detect.DEAD
    np.testing.assert_array_equal(classes, dead)
    assert body["nan_is_absent"] is True and body["scale"] == "linear"
    assert [body["regions"][code] for code in body["marked"]] == ["dead", "saturated"]
    assert {body["regions"][code]: body["marks"][body["regions"][code]] for code in body["marked"]} == {
        "dead": "vertical", "saturated": "antidiagonal"}


def test_update_ratio_without_weight_norm_has_no_layer_rows(tmp_path):
    writer = EventWriter(tmp_path / "run")
    for step in range(3):
        writer.write_stat("update_ratio", step, np.full(len(NAMES), 1e-3), NAMES)
    writer.close()
    client = make_client(tmp_path)
    code, body = get(client, "/heatmap", run="run", stat="update_ratio")
    assert code == 400 and "weight_norm" in body["error"] and "by=variable" in body["error"]
    assert get(client, "/heatmap", run="run", stat="update_ratio", by="variable")[0] == 200


def test_spike_and_nan_survive_downsampling(client, logdir):
    code, body = get(client, "/heatmap", run="run_a", stat="grad_norm", columns=7, by="variable")
    assert code == 200 and body["downsampled"] is True and body["columns"] == 7
    assert "max" in body["reduction"]
    steps, _, values = read_run(logdir / "run_a").stat("grad_norm")
    got = heatmap_values(body)
    np.testing.assert_allclose(got, bucket_max(steps, values, body), rtol=LOG16_RTOL, equal_nan=True)
    spike_column = next(c for c, end in enumerate(body["step_end"]) if end >= SPIKE[0])
    assert got[SPIKE[1], spike_column] == pytest.approx(1e4, rel=LOG16_RTOL)
    nan_column = next(c for c, end in enumerate(body["step_end"]) if end >= NAN[0])
    assert np.isnan(got[NAN[1], nan_column])
    # A single column still keeps both.
    _, one = get(client, "/heatmap", run="run_a", stat="grad_norm", columns=1, by="variable")
    assert np.isnan(heatmap_values(one)[NAN[1], 0])
    assert heatmap_values(one)[SPIKE[1], 0] == pytest.approx(1e4, rel=LOG16_RTOL)


def test_undefined_update_ratio_does_not_win_a_bucket(client, logdir):
    _, full = get(client, "/heatmap", run="run_a", stat="update_ratio", columns=STEPS, by="variable")
    assert np.isnan(heatmap_values(full)[1, 0])  # undefined at step 0 ...
    _, body = get(client, "/heatmap", run="run_a", stat="update_ratio", columns=3, by="variable")
    steps, _, values = read_run(logdir / "run_a").stat("update_ratio")
    np.testing.assert_allclose(heatmap_values(body), bucket_max(steps, values, body, nan_wins=False),
                               rtol=LOG16_RTOL)
    assert np.isfinite(heatmap_values(body)[1, 0])  # ... but not a spike


def test_regions_are_keras_vg_detect_on_the_same_data(client, logdir):
    run = read_run(logdir / "run_a")
    expected = detect.classify({s: run.stat(s) for s in run.stats()})
    _, body = get(client, "/heatmap", run="run_a", stat="grad_norm", columns=1000, by="variable")
    np.testing.assert_array_equal(heatmap_classes(body), expected.codes.T)
    assert body["regions"] == list(detect.CLASS_NAMES)
    assert heatmap_classes(body)[SPIKE[1], SPIKE[0]] == detect.EXPLODING
    assert heatmap_classes(body)[0, 0] == detect.VANISHING
    # Downsampled, the most serious class of a bucket wins.
    _, small = get(client, "/heatmap", run="run_a", stat="grad_norm", columns=2, by="variable")
    assert heatmap_classes(small)[SPIKE[1], 0] == detect.EXPLODING
    assert heatmap_classes(small)[NAN[1], 1] == detect.NONFINITE

    code, answer = get(client, "/classification", run="run_a")
    assert code == 200
    episodes = detect.find_episodes(expected)
    assert [e["message"] for e in answer["episodes"]] == [e.message for e in episodes]
    assert {e["kind"] for e in answer["episodes"]} >= {"vanishing", "exploding", "nonfinite"}


def test_series_equals_reader(client, logdir):
    steps, names, values = read_run(logdir / "run_a").stat("grad_norm")
    code, body = get(client, "/series", run="run_a", stat="grad_norm", name=names[NAN[1]], by="variable")
    assert code == 200 and body["downsampled"] is False and body["steps"] == steps.tolist()
    got = [float(v) if not isinstance(v, str) else float(v.replace("Infinity", "inf")) for v in body["max"]]
    np.testing.assert_array_equal(np.array(got, np.float32), values[:, NAN[1]])
    assert body["max"][NAN[0]] == "NaN"
    _, small = get(client, "/series", run="run_a", stat="grad_norm", name=names[SPIKE[1]], columns=4,
                   by="variable")
    assert small["downsampled"] is True and max(small["max"]) == pytest.approx(1e4)
    _, scalar = get(client, "/series", run="run_a", stat="global_grad_norm")
    assert len(scalar["max"]) == STEPS


@pytest.mark.parametrize("stat", ["grad_norm", "update_ratio", "dead_fraction"])
def test_a_layers_series_equals_the_readers(client, logdir, stat):
    steps, layers, values = read_run(logdir / "run_layers").stat(stat, by="layer")
    for row, layer in enumerate(layers):
        code, body = get(client, "/series", run="run_layers", stat=stat, name=layer)
        assert code == 200 and body["steps"] == steps.tolist()
        np.testing.assert_allclose(np.array(body["max"], np.float32), values[:, row], rtol=1e-6, equal_nan=True)


def test_profile_at_a_step_and_over_a_bucket(client, logdir):
    _, names, values = read_run(logdir / "run_a").stat("grad_norm")
    code, body = get(client, "/profile", run="run_a", stat="grad_norm", step=5, by="variable")
    assert code == 200 and body["step"] == 5 and body["names"] == names
    np.testing.assert_array_equal(np.array(body["values"], np.float32), values[5])
    _, bucket = get(client, "/profile", run="run_a", stat="grad_norm", step=20, step_end=29, by="variable")
    assert (bucket["step"], bucket["step_end"]) == (20, 29)
    assert bucket["values"][SPIKE[1]] == pytest.approx(1e4)
    _, last = get(client, "/profile", run="run_a", stat="grad_norm")
    assert last["step"] == STEPS - 1


def test_profile_per_layer(client, logdir):
    _, layers, values = read_run(logdir / "run_layers").stat("grad_norm", by="layer")
    code, body = get(client, "/profile", run="run_layers", stat="grad_norm", step=5)
    assert code == 200 and body["names"] == layers
    np.testing.assert_allclose(np.array(body["values"], np.float32), values[5], rtol=1e-6)
    _, bucket = get(client, "/profile", run="run_layers", stat="grad_norm", step=20, step_end=29)
    assert bucket["values"][LAYER_SPIKE[1] // 2] == pytest.approx(1e4, rel=1e-3)


def test_events_route(client):
    code, body = get(client, "/events", run="run_a")
    assert code == 200
    kinds = [(e["kind"], e["step"]) for e in body["events"]]
    assert kinds == [("clip_on", 10), ("clip_off", 20), ("skip", 37)]


def test_untrusted_names_come_back_as_plain_json_strings(client):
    _, body = get(client, "/heatmap", run="run_xss", stat="grad_norm", columns=10, by="variable")
    assert body["names"][0] == XSS_NAME
    _, body = get(client, "/heatmap", run="run_xss", stat="grad_norm", columns=10)
    assert body["names"][0] == XSS_NAME.rsplit("/", 1)[0] and body["row_variables"][0] == [XSS_NAME]


@pytest.mark.parametrize("route, params, needle", [
    ("/heatmap", {"run": "nope", "stat": "grad_norm"}, "Unknown run"),
    ("/heatmap", {"run": "run_a", "stat": "nope"}, "stat"),
    ("/heatmap", {"run": "run_a", "stat": "global_grad_norm"}, "stat"),
    ("/heatmap", {"run": "run_a", "stat": "dead_fraction"}, "no statistic"),
    ("/heatmap", {"run": "run_a", "stat": "grad_norm", "columns": "abc"}, "integer"),
    ("/heatmap", {"run": "run_a", "stat": "grad_norm", "columns": "0"}, "columns"),
    ("/heatmap", {"run": "run_a", "stat": "grad_norm", "columns": "1e9"}, "integer"),
    ("/heatmap", {"stat": "grad_norm"}, "run"),
    ("/heatmap", {"run": "run_a", "stat": "grad_norm", "by": "layers"}, "`by`"),
    ("/series", {"run": "run_a", "stat": "grad_norm", "name": "x", "by": "Variable"}, "`by`"),
    ("/profile", {"run": "run_a", "stat": "grad_norm", "by": "row"}, "`by`"),
    ("/series", {"run": "run_a", "stat": "grad_norm", "name": "nope"}, "Unknown variable"),
    ("/series", {"run": "run_a", "stat": "grad_norm", "name": "dense_0/kernel"}, "Unknown variable or layer"),
    ("/series", {"run": "run_a", "stat": "grad_norm", "name": "x", "columns": "-3"}, "columns"),
    ("/profile", {"run": "run_a", "stat": "grad_norm", "step": "five"}, "integer"),
    ("/events", {"run": "nope"}, "Unknown run"),
    ("/classification", {"run": "nope"}, "Unknown run"),
    ("/classification", {}, "run"),
])
def test_bad_parameters_get_a_json_400(client, route, params, needle):
    response = client.get(PLUGIN + route, query_string=params)
    text = response.get_data(as_text=True)
    assert response.status_code == 400, text
    assert response.headers["Content-Type"].startswith("application/json")
    assert needle in json.loads(text)["error"]
    assert "Traceback" not in text


def test_json_has_sorted_keys_and_nosniff(client):
    response = client.get(PLUGIN + "/heatmap", query_string={"run": "run_a", "stat": "grad_norm"})
    text = response.get_data(as_text=True)
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_retention_is_reported(tmp_path):
    write_run(tmp_path / "run")
    # TensorBoard's Python loader keeps 10 records per series unless told otherwise.
    cut = make_client(tmp_path, keep_all=False)
    _, body = get(cut, "/heatmap", run="run", stat="grad_norm")
    assert body["retention"] == {
        "hint": "--samples_per_plugin=keras_vg=0", "limit": 10, "may_be_cut": True, "points": 10,
    }
    _, events = get(cut, "/events", run="run")
    assert events["retention"]["may_be_cut"] is False  # 3 records, below the limit
    kept = make_client(tmp_path, sampling_hints={fmt.PLUGIN_NAME: 0})
    _, body = get(kept, "/heatmap", run="run", stat="grad_norm")
    assert body["retention"]["may_be_cut"] is False and body["num_steps"] == STEPS
    # The Rust data server keeps 100 by default.
    assert data_lib.Reader(object()).retention(100)["limit"] == 100


TRAVERSALS = [
    "../plugin.py", "..%2fplugin.py", "..%2Fplugin.py", "%2e%2e/plugin.py", "%2e%2e%2fplugin.py",
    "..\\plugin.py", "..%5cplugin.py", "/etc/passwd", "%2fetc%2fpasswd", "../../../../etc/passwd",
    "..%252fplugin.py", "....//plugin.py", "./index.js/../../plugin.py", "index.js%00.css",
    "static/index.js", "./index.js", "index.js/", ".", "..", "", "%2e", "index.js?x=../plugin.py/..",
    "../static/index.js", "..;/plugin.py", "%c0%ae%c0%ae/plugin.py", "~/.bashrc", "style.css/..",
    "../__init__.py", "..%00/plugin.py", "INDEX.JS", "index.js ",
]


def test_static_files_and_traversal(client):
    response = client.get(PLUGIN + "/static/index.js")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/javascript")
    assert b"export async function render" in response.get_data()
    assert client.get(PLUGIN + "/static/style.css").status_code == 200
    for attempt in TRAVERSALS:
        response = client.get(PLUGIN + "/static/" + attempt)
        assert response.status_code == 404 or (
            attempt.startswith("index.js?") and response.get_data().startswith(b"//")
        ), attempt


def test_plugin_entry_page_allows_only_same_origin_scripts(client):
    response = client.get("/data/plugin_entry.html", query_string={"name": fmt.PLUGIN_NAME})
    csp = dict(
        part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";")
    )
    assert "'self'" in csp["script-src"] and "unsafe-inline" not in csp["script-src"]
    assert "http" not in csp["script-src"]
    assert "./plugin/keras_vg/static/index.js" in response.get_data(as_text=True) or \
        "/static/index.js" in response.get_data(as_text=True)


def test_static_page_never_parses_html_and_loads_nothing_remote():
    static = os.path.join(os.path.dirname(__file__), "..", "tb_plugin", "static")
    files = sorted(os.listdir(static))
    assert files and not [f for f in files if not f.endswith((".js", ".css"))]  # no HTML, no inline script
    for name in files:
        with open(os.path.join(static, name), encoding="utf-8") as handle:
            text = handle.read()
        for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                          "new Function", "http://", "https://", "//cdn"):
            assert forbidden not in text, (name, forbidden)


def test_entry_module_imports_nothing_heavy():
    code = (
        "import sys, tb_plugin.loader, tb_plugin.plugin\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')"
        " or m in ('keras_vg.monitor', 'keras_vg.tap', 'keras_vg.detect'))\n"
        "print(heavy)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            check=True, cwd=root).stdout
    assert output.strip() == "[]"


def test_entry_point_is_registered():
    import importlib.metadata

    points = [ep for ep in importlib.metadata.entry_points(group="tensorboard_plugins")
              if ep.name == fmt.PLUGIN_NAME]
    if not points and os.environ.get("CI") != "true":
        pytest.skip("keras-vg is not installed (pip install -e .): no entry point to find")
    assert len(points) == 1
    loader = points[0].load()()
    plugin = loader.load(base_plugin.TBContext(data_provider=None))
    assert plugin.plugin_name == fmt.PLUGIN_NAME


@pytest.mark.fit
def test_serves_what_the_real_monitor_wrote(tmp_path):
    import keras

    from keras_vg.monitor import GradientMonitor

    log_dir = tmp_path / "monitor_run"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    x[40:48] *= 1e3  # batch 5 of 8: a one-step gradient spike
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[GradientMonitor(log_dir, every=1, verbose=0)])

    run = read_run(log_dir)
    steps, names, values = run.stat("grad_norm")
    client = make_client(tmp_path)
    code, listing = get(client, "/runs")
    assert code == 200 and [r["run"] for r in listing["runs"]] == ["monitor_run"]
    _, body = get(client, "/heatmap", run="monitor_run", stat="grad_norm", columns=1000, by="variable")
    assert body["names"] == names and body["step_start"] == steps.tolist()
    np.testing.assert_allclose(heatmap_values(body), values.T, rtol=LOG16_RTOL, equal_nan=True)
    _, series = get(client, "/series", run="monitor_run", stat="grad_norm", name=names[0], by="variable")
    np.testing.assert_array_equal(np.array(series["max"], np.float32), values[:, 0])
    # Layer rows: the layers the monitor's model summary names, combined as read_run combines them.
    for stat in ("grad_norm", "update_ratio"):
        _, layers = get(client, "/heatmap", run="monitor_run", stat=stat, columns=1000)
        layer_steps, layer_names, layer_values = run.stat(stat, by="layer")
        assert layers["names"] == layer_names == [layer.name for layer in model.layers]
        assert layers["row_variables"] == [[v.path for v in layer.trainable_variables] for layer in model.layers]
        np.testing.assert_allclose(heatmap_values(layers), layer_values.T, rtol=LOG16_RTOL, equal_nan=True)
    # Downsampled to two columns, each keeps its bucket's max: the spike survives.
    _, small = get(client, "/heatmap", run="monitor_run", stat="grad_norm", columns=2, by="variable")
    assert small["downsampled"] is True
    np.testing.assert_allclose(heatmap_values(small), bucket_max(steps, values, small),
                               rtol=LOG16_RTOL, equal_nan=True)
    spike = np.unravel_index(np.nanargmax(values), values.shape)
    assert np.nanmax(values) > 100 * np.nanmedian(values[:, spike[1]])  # it is a spike
    assert np.nanmax(heatmap_values(small)[spike[1]]) == pytest.approx(values[spike], rel=LOG16_RTOL)
    for stat in run.stats():
        if stat in ("dead_fraction", "saturation_fraction", "update_ratio", "weight_norm"):
            _, other = get(client, "/heatmap", run="monitor_run", stat=stat, columns=1000, by="variable")
            np.testing.assert_allclose(heatmap_values(other), run.stat(stat)[2].T,
                                       rtol=LOG16_RTOL, equal_nan=True)


@pytest.mark.fit
def test_serves_the_clipping_autoclip_recorded(tmp_path):
    import keras

    import keras_vg

    log_dir = tmp_path / "clipped_run"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = rng.normal(size=(96, 1)).astype("float32")
    x[80:88] *= 1e3  # batch 10 of 12: a spike after ZScore's 4 warm-up steps
    x[88] = np.nan  # batch 11: a non-finite gradient, skipped
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), verbose=0)
    monitor = keras_vg.GradientMonitor(log_dir, every=1, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, clip])
    monitor.close()

    run = read_run(log_dir)
    recorded = [(e["kind"], e["step"]) for e in run.events() if e["kind"] in ("clip_on", "clip_off", "skip")]
    assert recorded == [("clip_on", 10), ("skip", 11)]
    client = make_client(tmp_path)
    _, body = get(client, "/events", run="clipped_run")
    served = [(e["kind"], e["step"]) for e in body["events"] if e["kind"] in ("clip_on", "clip_off", "skip")]
    assert served == recorded
    code, listing = get(client, "/runs")
    stats = listing["runs"][0]["stats"]
    assert code == 200 and {"global_grad_norm_clipped", "clipped", "skipped"} <= set(stats)


def test_steps_autoclip_skipped_are_alerts_of_their_own_never_stalls(tmp_path):
    import keras

    import keras_vg

    log_dir = tmp_path / "skipping_run"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4)).astype("float32")
    y = rng.normal(size=(128, 1)).astype("float32")
    x[96:] = np.nan  # batches 12-15 of 16: non-finite gradients, which AutoClip skips
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    monitor = keras_vg.GradientMonitor(log_dir, every=1, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor, keras_vg.AutoClip(verbose=0, skip_patience=100)])
    monitor.close()

    skipped = [e["step"] for e in read_run(log_dir).events() if e["kind"] == "skip"]
    assert skipped == [12, 13, 14, 15]
    code, answer = get(make_client(tmp_path), "/classification", run="skipping_run")
    assert code == 200
    alerts = [(e["kind"], e["first_step"], e["last_step"]) for e in answer["episodes"]]
    assert ("skipped", 12, 15) in alerts, alerts
    assert "skipped by AutoClip" in next(e["message"] for e in answer["episodes"] if e["kind"] == "skipped")
    # The weights stood still on those steps because AutoClip skipped them: not a stall.
    assert not any(kind == "stalled" and end >= 12 for kind, _, end in alerts), alerts
