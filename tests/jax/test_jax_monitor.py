"""GradientMonitor on Keras's JAX backend, against `jax.grad` and against the TensorFlow-backend contract.

Run with `KERAS_BACKEND=jax` (`make test` does): see tests/conftest.py.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_vg

pytestmark = pytest.mark.fit

LEARNING_RATE = 0.1
BATCH = 32
rng = np.random.RandomState(0)
X = rng.randn(8 * BATCH, 8).astype("float32")
Y = (X @ rng.randn(8, 1)).astype("float32")


def build_mlp(optimizer=None, **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Dense(16, activation="relu", bias_initializer="ones"),
        keras.layers.Dense(16, activation="tanh", bias_initializer="ones"),
        keras.layers.Dense(1),
    ])  # no keras.Input: built by fit, as tutorials write it
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LEARNING_RATE), loss="mse", **compile_kwargs)
    return model


def fit_monitored(model, log_dir, epochs=1, every=1, **kwargs):
    monitor = keras_vg.GradientMonitor(log_dir, every=every, verbose=0, **kwargs)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[monitor])
    return monitor, keras_vg.read_run(log_dir)


def reference_sgd_run(steps):
    """Per step: gradient norms, SGD update ratios and the weights before the update, from jax.grad.

    The forward pass is the model's own stateless call; nothing of keras-vg is involved.
    """
    model = build_mlp()
    model.build((None, 8))
    weights = [v.value for v in model.trainable_variables]

    def loss(trainable, x, y):
        prediction, _ = model.stateless_call(trainable, [], x, training=True)
        return jnp.mean(jnp.square(prediction - y))

    gradient = jax.jit(jax.grad(loss))
    norms, ratios, before = [], [], []
    for step in range(steps):
        start = (step * BATCH) % len(X)
        grads = gradient(weights, X[start:start + BATCH], Y[start:start + BATCH])
        g = [np.asarray(t, np.float64) for t in grads]
        w = [np.asarray(t, np.float64) for t in weights]
        norms.append([np.linalg.norm(t) for t in g])
        ratios.append([LEARNING_RATE * np.linalg.norm(a) / np.linalg.norm(b) if np.any(b) else np.nan
                       for a, b in zip(g, w)])
        before.append(w)
        weights = [v - LEARNING_RATE * t for v, t in zip(weights, grads)]
    return np.array(norms), np.array(ratios), before


def test_records_match_jax_grad(tmp_path):
    model = build_mlp()
    _, run = fit_monitored(model, tmp_path, epochs=2)
    steps, names, grad_norm = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, np.arange(16))
    assert names == [v.path for v in model.trainable_variables]
    ref_norms, ref_ratios, _ = reference_sgd_run(16)
    np.testing.assert_allclose(grad_norm, ref_norms, rtol=2e-5)
    np.testing.assert_allclose(run.stat("update_ratio")[2], ref_ratios, rtol=2e-4)
    np.testing.assert_allclose(run.stat("global_grad_norm")[2], np.sqrt((ref_norms ** 2).sum(axis=1)), rtol=2e-5)
    assert run.stat("grad_nonfinite")[2].sum() == 0


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_every_records_each_record_steps_own_values(steps_per_execution, tmp_path):
    full = fit_monitored(build_mlp(), tmp_path / "full", epochs=2)[1]
    _, run = fit_monitored(build_mlp(steps_per_execution=steps_per_execution), tmp_path / "every3", epochs=2,
                           every=3)
    for stat in ("grad_norm", "weight_norm", "update_ratio", "dead_fraction", "saturation_fraction"):
        steps, _, values = run.stat(stat)
        np.testing.assert_array_equal(steps, np.arange(0, 16, 3))
        np.testing.assert_allclose(values, full.stat(stat)[2][::3], rtol=1e-5, atol=1e-7, err_msg=stat)


def test_dead_and_saturation_fractions_match_numpy(tmp_path):
    model = build_mlp()
    _, run = fit_monitored(model, tmp_path, every=3)
    steps, names, dead = run.stat("dead_fraction")
    _, saturation_names, saturation = run.stat("saturation_fraction")
    assert names == [model.layers[0].name] and saturation_names == [model.layers[1].name]
    _, _, weights = reference_sgd_run(int(steps[-1]) + 1)
    for row, step in enumerate(steps):
        w = weights[step]
        x = X[step * BATCH:(step + 1) * BATCH]
        hidden = np.maximum(x @ w[0] + w[1], 0)
        tanh = np.tanh(hidden @ w[2] + w[3])
        np.testing.assert_allclose(dead[row, 0], np.mean(~(hidden > 0).any(axis=0)), atol=1e-6)
        np.testing.assert_allclose(saturation[row, 0], np.mean(np.abs(tanh) > 0.99), atol=1e-6)


def test_two_functions_each_traced_once_and_training_unchanged(tmp_path):
    monitored = build_mlp()
    monitor = keras_vg.GradientMonitor(tmp_path, every=3, verbose=0)
    for _ in range(2):
        monitored.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert monitor.tap.trace_count == 1
    plain = build_mlp()
    plain.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(monitored.weights, plain.weights):
        # XLA compiles the instrumented step as a whole: float32 rounding, no more.
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


NO_TENSORFLOW = """
import sys
import keras, numpy as np
import keras_vg
model = keras.Sequential([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
x = np.random.rand(64, 8).astype("float32")
x[40] = np.nan  # a step AutoClip skips
clip = keras_vg.AutoClip(policy="agc", verbose=0)
model.fit(x, x[:, :1], batch_size=8, verbose=0,
          callbacks=[clip, keras_vg.GradientMonitor(sys.argv[1], every=2, verbose=0)])
assert clip.state()["skipped"] == 1, clip.state()
run = keras_vg.read_run(sys.argv[1])
assert run.stat("skipped")[2].sum() == 1
print(run.diagnose())
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""


def test_training_with_autoclip_and_reading_on_jax_import_no_tensorflow(tmp_path):
    # A fresh process: Keras's own set_random_seed, used by the test fixtures, imports TensorFlow.
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_recompile_continues_the_step_axis_and_the_dashboard_serves_the_run(tmp_path):
    import json

    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from werkzeug import test as werkzeug_test

    from tb_plugin.plugin import GradientsPlugin

    model = build_mlp()
    fit_monitored(model, tmp_path / "run", every=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")  # a new optimizer: its count restarts
    _, run = fit_monitored(model, tmp_path / "run", every=2)
    np.testing.assert_array_equal(run.stat("grad_norm")[0], [0, 2, 4, 6, 7, 9, 11, 13])
    assert "Model: sequential (Dense x3)" in str(run.diagnose())  # the report reads a JAX run like any other

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"keras_vg": 0})
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    plugin = GradientsPlugin(base_plugin.TBContext(logdir=str(tmp_path), data_provider=provider))
    client = werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))
    try:
        runs = json.loads(client.get("/data/plugin/keras_vg/runs").get_data(as_text=True))
        assert "run" in json.dumps(runs)
        for by in ("layer", "variable"):  # the dashboard opens on layers, variables one click away
            response = client.get("/data/plugin/keras_vg/heatmap",
                                  query_string={"run": "run", "stat": "grad_norm", "by": by})
            heatmap = json.loads(response.get_data(as_text=True))
            assert response.status_code == 200 and heatmap["names"] == run.stat("grad_norm", by=by)[1]
    finally:
        plugin.close()
