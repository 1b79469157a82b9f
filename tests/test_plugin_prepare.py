"""The plugin's cache over live data: appended records, rewritten steps, background preparation.

Runs are written with `keras_vg.event_writer.EventWriter` in several flushes,
read by a real `EventMultiplexer` + `MultiplexerDataProvider` that is reloaded
between them, as TensorBoard does while a run trains. References are
`keras_vg.reader.read_run` and `keras_vg.detect.classify` on the files, and a
fresh `Reader` that never saw the earlier data.
"""

import gc
import json
import threading

import numpy as np
import pytest
import tensorboard_browser as testing
from tensorboard import context as context_lib
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider as provider_lib
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test

from keras_vg import detect
from keras_vg import format as fmt
from keras_vg.event_writer import EventWriter
from keras_vg.reader import read_run
from tb_plugin import background, downsample
from tb_plugin import data as data_lib
from tb_plugin import plugin as plugin_lib
from tb_plugin.plugin import GradientsPlugin

NAMES = [f"dense_{i}/kernel" for i in range(6)]
PLUGIN = "/data/plugin/keras_vg"
LOG16_RTOL = 10 ** (0.5 / downsample.LOG16_SCALE) - 1
STATS = ("grad_norm", "update_ratio", "global_grad_norm")
CTX = context_lib.RequestContext()


def write_steps(writer, steps, scale=1.0, seed=0):
    """Writes grad norms (input side vanishing), update ratios and the global norm."""
    rng = np.random.default_rng(seed)
    for step in steps:
        grad = scale * np.logspace(-7, 0, len(NAMES)) * (1 + 0.1 * rng.random(len(NAMES)))
        if step == 45:
            grad[3] = 1e5  # a one-step explosion inside the appended records
        writer.write_stat("grad_norm", step, grad, NAMES)
        writer.write_stat("update_ratio", step, np.full(len(NAMES), 1e-3), NAMES)
        writer.write_stat("global_grad_norm", step, float(np.nansum(grad)))
    writer.flush()


class CountingProvider:
    """A data provider that counts `read_tensors` calls and passes everything through."""

    def __init__(self, provider, delay=0.0):
        self._provider = provider
        self._delay = delay
        self._lock = threading.Lock()
        self.reads = 0

    def read_tensors(self, *args, **kwargs):
        with self._lock:
            self.reads += 1
        if self._delay:
            threading.Event().wait(self._delay)  # lets a second caller arrive meanwhile
        return self._provider.read_tensors(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._provider, name)


@pytest.fixture
def live(tmp_path):
    """A run being written: `(writer, reload, provider)`; call `reload()` after writing."""
    writer = EventWriter(tmp_path / "run", flush_secs=3600)
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance={"tensors": 10}, tensor_size_guidance={fmt.PLUGIN_NAME: 0}
    )
    provider = CountingProvider(provider_lib.MultiplexerDataProvider(multiplexer, str(tmp_path)))

    def reload():
        # What TensorBoard's reload thread does.
        multiplexer.AddRunsFromDirectory(str(tmp_path))
        multiplexer.Reload()

    yield writer, reload, provider
    writer.close()


def assert_same_series(got, expected):
    assert got.names == expected.names
    np.testing.assert_array_equal(got.steps, expected.steps)
    np.testing.assert_array_equal(got.values, expected.values)


def cold_series(provider, stat):
    return data_lib.Reader(provider).series(CTX, "", "run", stat)


def test_appended_records_extend_the_cached_series(live, tmp_path):
    writer, reload, provider = live
    reader = data_lib.Reader(provider)
    write_steps(writer, range(0, 30))
    reload()
    first = {stat: reader.series(CTX, "", "run", stat) for stat in STATS}
    first_values = {stat: series.values.copy() for stat, series in first.items()}

    write_steps(writer, range(30, 50), seed=1)
    reload()
    second = {stat: reader.series(CTX, "", "run", stat) for stat in STATS}
    write_steps(writer, range(50, 55), seed=2)
    reload()
    third = {stat: reader.series(CTX, "", "run", stat) for stat in STATS}

    run = read_run(tmp_path / "run")
    for stat in STATS:
        assert_same_series(third[stat], cold_series(provider, stat))
        steps, names, values = run.stat(stat)
        np.testing.assert_array_equal(third[stat].steps, steps)
        np.testing.assert_array_equal(third[stat].values, np.reshape(values, (len(steps), -1)).T)
        # The last append wrote into the storage the second series left room in ...
        assert np.shares_memory(third[stat].values, second[stat].values)
        # ... without changing what earlier series hold.
        np.testing.assert_array_equal(first[stat].values, first_values[stat])
        assert second[stat].values.shape[1] == 50
    assert third["grad_norm"].values[3, 45] == pytest.approx(1e5)


def test_rewritten_steps_are_stacked_anew(live):
    writer, reload, provider = live
    reader = data_lib.Reader(provider)
    write_steps(writer, range(0, 40))
    reload()
    before = reader.series(CTX, "", "run", "grad_norm")
    # A restarted run writes steps 20.. again: TensorBoard drops the old ones.
    write_steps(writer, range(20, 40), scale=1e3, seed=3)
    reload()
    after = reader.series(CTX, "", "run", "grad_norm")
    assert_same_series(after, cold_series(provider, "grad_norm"))
    assert not np.shares_memory(after.values, before.values)
    np.testing.assert_array_equal(after.steps, np.arange(40))
    assert after.values[-1, 30] > 100 * before.values[-1, 30]  # the rewritten values are served


def test_one_read_for_concurrent_requests(live):
    writer, reload, provider = live
    write_steps(writer, range(10))
    reload()
    slow = CountingProvider(provider, delay=0.2)
    reader = data_lib.Reader(slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(reader.series(CTX, "", "run", "grad_norm")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert slow.reads == 1
    assert results[0] is results[1] is results[2]


def get(client, route, **params):
    response = client.get(PLUGIN + route, query_string=params)
    return response.status_code, json.loads(response.get_data(as_text=True))


class ObservedPlugin(GradientsPlugin):
    """The plugin with its background passes counted from outside: the product keeps no count."""

    def __init__(self, *args, **kwargs):
        self.passes = 0
        self.passed = threading.Condition()
        super().__init__(*args, **kwargs)

    def prepare_runs(self, ctx, eid, requested):
        try:
            return super().prepare_runs(ctx, eid, requested)
        finally:
            with self.passed:
                self.passes += 1
                self.passed.notify_all()


def wait_for_passes(plugin, count):
    """Waits until the background thread has finished `count` more passes."""
    with plugin.passed:
        target = plugin.passes + count
        assert plugin.passed.wait_for(lambda: plugin.passes >= target, timeout=60), "no background pass"


def heatmaps(client):
    """The grad_norm heatmap with layer rows (the page's first) and with variable rows."""
    answers = [get(client, "/heatmap", run="run", stat="grad_norm", columns=1000, by=by)
               for by in ("layer", "variable")]
    assert [code for code, _ in answers] == [200, 200]
    return [body for _, body in answers]


def assert_heatmap_matches_files(body, run_dir):
    run = read_run(run_dir)
    by = body["rows"]
    steps, names, values = run.stat("grad_norm", by=by)
    assert body["names"] == names and body["step_start"] == steps.tolist()
    got = downsample.decode_log16(body["values"], (len(names), body["columns"]))
    np.testing.assert_allclose(got, values.T, rtol=LOG16_RTOL, equal_nan=True)
    # One variable per layer here (`dense_i/kernel`), so a layer's class is its variable's.
    expected = detect.classify({s: run.stat(s) for s in run.stats()})
    classes = np.zeros((len(names), body["columns"]), np.int8)
    for row, first, last, code in np.reshape(body["classes"]["runs"], (-1, 4)):
        classes[row, first:last + 1] = code
    np.testing.assert_array_equal(classes, expected.codes.T)


def test_background_preparation_is_ready_before_the_request(live, tmp_path):
    writer, reload, provider = live
    write_steps(writer, range(0, 30))
    reload()
    plugin = ObservedPlugin(base_plugin.TBContext(data_provider=provider), poll_seconds=0.01)
    client = werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))
    try:
        assert get(client, "/runs")[0] == 200  # the page opens: the thread starts
        wait_for_passes(plugin, 2)
        reads = provider.reads
        assert reads == len(STATS)  # the one run, every statistic, read once
        for body in heatmaps(client):
            assert_heatmap_matches_files(body, tmp_path / "run")
        assert provider.reads == reads  # answered from the prepared data

        # TensorBoard loads new records while training goes on.
        write_steps(writer, range(30, 60), seed=1)
        reload()
        wait_for_passes(plugin, 2)
        reads = provider.reads
        for body in heatmaps(client):
            assert body["num_steps"] == 60
            assert_heatmap_matches_files(body, tmp_path / "run")
            assert detect.EXPLODING in np.reshape(body["classes"]["runs"], (-1, 4))[:, 3]
        assert provider.reads == reads
    finally:
        assert plugin.close()


def test_plugin_built_by_tensorboard_prepares_before_the_page_opens(live, tmp_path, monkeypatch):
    from tb_plugin.loader import GradientsPluginLoader

    writer, reload, provider = live
    write_steps(writer, range(0, 30))
    reload()
    monkeypatch.setattr(plugin_lib, "GradientsPlugin", ObservedPlugin)  # what the loader builds
    plugin = GradientsPluginLoader().load(base_plugin.TBContext(data_provider=provider))
    try:
        assert isinstance(plugin, ObservedPlugin) and plugin._preparer.running  # no request yet
        wait_for_passes(plugin, 2)
        reads = provider.reads
        assert reads == len(STATS)
        client = werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))
        for body in heatmaps(client):
            assert_heatmap_matches_files(body, tmp_path / "run")
        assert provider.reads == reads  # the first heatmaps were ready
    finally:
        assert plugin.close()


def test_prepares_the_runs_requested_lately(tmp_path):
    for name in ("a", "b", "c"):
        testing.write_demo_run(tmp_path / name, NAMES, steps=5)
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={fmt.PLUGIN_NAME: 0})
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = provider_lib.MultiplexerDataProvider(multiplexer, str(tmp_path))
    plugin = GradientsPlugin(base_plugin.TBContext(data_provider=provider), prepare_in_background=False)
    # Nothing shown yet: the runs written last.
    assert plugin.prepare_runs(CTX, "", []) == ["c", "b"]
    assert plugin.prepare_runs(CTX, "", ["a", "gone"]) == ["a", "c"]
    assert plugin.prepare_runs(CTX, "", ["b", "a", "c"]) == ["b", "a"]


def preparer_threads():
    return [t for t in threading.enumerate() if t.name == "keras-vg-prepare"]


def test_the_thread_ends_on_close_when_idle_and_with_its_plugin(tmp_path):
    testing.write_demo_run(tmp_path / "run", NAMES, steps=5)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = provider_lib.MultiplexerDataProvider(multiplexer, str(tmp_path))
    before = set(preparer_threads())

    plugin = GradientsPlugin(base_plugin.TBContext(data_provider=provider), poll_seconds=0.01)
    assert not plugin._preparer.running  # no request, no thread
    plugin.runs_impl(CTX, "")
    get(werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider)), "/runs")
    assert plugin._preparer.running
    assert plugin.close() and not plugin._preparer.running

    plugin = GradientsPlugin(base_plugin.TBContext(data_provider=provider), poll_seconds=0.01)
    plugin._preparer.notice(CTX, "")
    thread = plugin._preparer._thread
    del plugin
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()  # the plugin was collected: its thread ended

    calls = []
    owner = type("Owner", (), {"prepare": lambda self, *args: calls.append(args)})()
    idle = background.Preparer(owner.prepare, poll_seconds=0.01, idle_seconds=0.05)
    idle.notice(CTX, "eid", run="r")
    thread = idle._thread
    thread.join(30)
    assert not thread.is_alive() and calls and calls[0][1:] == ("eid", ["r"])
    assert set(preparer_threads()) <= before
