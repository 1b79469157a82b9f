"""GradientMonitor's numbers against independent references, in every compilation mode."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vg

pytestmark = pytest.mark.fit

LEARNING_RATE = 0.1
BATCH = 64


def adam():
    return keras.optimizers.Adam(0.01)


def build_mlp(optimizer=None, strategy=None, **compile_kwargs):
    """`optimizer` is a factory, so that a strategy's optimizer is made inside its scope."""

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", bias_initializer="ones"),
            keras.layers.Dense(16, activation="tanh", bias_initializer="ones"),
            keras.layers.Dense(1, dtype="float32"),
        ])
        model.compile(optimizer=(optimizer or (lambda: keras.optimizers.SGD(LEARNING_RATE)))(), loss="mse",
                      **compile_kwargs)
        return model

    if strategy is None:
        return build()
    with strategy.scope():
        return build()


def fit_monitored(model, data, log_dir, epochs=1, every=1, **monitor_kwargs):
    x, y = data
    monitor = keras_vg.GradientMonitor(log_dir, every=every, verbose=0, **monitor_kwargs)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[monitor])
    return monitor, keras_vg.read_run(log_dir)


def reference_sgd_run(data, steps):
    """Per-step gradient norms, SGD update ratios and non-finite counts from a GradientTape loop of our own."""
    x, y = data
    model = build_mlp()
    loss_fn = keras.losses.MeanSquaredError()
    norms, ratios, nonfinite = [], [], []
    for step in range(steps):
        start = (step * BATCH) % len(x)
        xb, yb = x[start:start + BATCH], y[start:start + BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        g = [t.numpy().astype(np.float64) for t in grads]
        norms.append([np.linalg.norm(t) for t in g])
        nonfinite.append([np.count_nonzero(~np.isfinite(t)) for t in g])
        # SGD's identity: Δw = lr·g, so ‖Δw‖/‖w‖ = lr·‖g‖/‖w‖ (undefined, NaN, where ‖w‖ = 0).
        ratios.append([LEARNING_RATE * np.linalg.norm(t) / np.linalg.norm(w) if np.any(w) else np.nan
                       for t, w in zip(g, weights)])
        for variable, t in zip(model.trainable_variables, grads):
            variable.assign(variable - LEARNING_RATE * t)
    return np.array(norms), np.array(ratios), np.array(nonfinite)


def test_grad_norm_and_update_ratio_match_gradient_tape(tmp_path, regression_data):
    model = build_mlp()
    _, run = fit_monitored(model, regression_data, tmp_path)
    steps, names, grad_norm = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, np.arange(4))
    assert names == [v.path for v in model.trainable_variables]
    ref_norms, ref_ratios, _ = reference_sgd_run(regression_data, 4)
    np.testing.assert_allclose(grad_norm, ref_norms, rtol=1e-5)
    np.testing.assert_allclose(run.stat("update_ratio")[2], ref_ratios, rtol=1e-5)
    np.testing.assert_allclose(
        run.stat("global_grad_norm")[2], np.sqrt((ref_norms**2).sum(axis=1)), rtol=1e-5
    )
    assert run.stat("grad_nonfinite")[2].sum() == 0


def test_grad_nonfinite_counts_the_record_steps_gradient_and_nothing_else_is_recorded(tmp_path, regression_data):
    # A NaN target in batch 1 makes that step's gradient NaN; the update spreads NaN to the
    # weights and so to every later gradient. (Partial counts: tests/test_stats.py.)
    x, y = regression_data
    y = y.copy()
    y[BATCH + 3] = np.nan
    _, run = fit_monitored(build_mlp(), (x, y), tmp_path, epochs=2, every=3, stats=["grad_nonfinite"])
    _, _, counts = reference_sgd_run((x, y), 7)
    assert counts[0].sum() == 0 and counts[1].sum() > 0
    assert run.stats() == ["grad_nonfinite"]
    steps, _, values = run.stat("grad_nonfinite")
    np.testing.assert_array_equal(steps, [0, 3, 6])
    np.testing.assert_array_equal(values, counts[[0, 3, 6]])


@pytest.mark.parametrize("stats", [["grad_max_abs"], ["global_grad_norm", "weight_norm"]])
def test_a_subset_of_statistics_records_the_same_values_and_no_others(
    stats, tmp_path, regression_data_module, function_reference
):
    _, run = fit_monitored(build_mlp(adam), regression_data_module, tmp_path, epochs=2, every=3, stats=stats)
    assert set(run.stats()) == set(stats)
    for stat in stats:
        steps, _, values = run.stat(stat)
        np.testing.assert_array_equal(steps, [0, 3, 6])
        np.testing.assert_allclose(values, function_reference.stat(stat)[2][::3], rtol=2e-5, err_msg=stat)


def test_no_retrace_after_first_trace(tmp_path, regression_data):
    monitor, run = fit_monitored(build_mlp(), regression_data, tmp_path, epochs=3)
    assert len(run.stat("grad_norm")[0]) == 12
    assert monitor.tap.trace_count == 1


def test_zero_initialised_bias_has_undefined_first_ratio(tmp_path, regression_data):
    model = build_mlp()
    model.layers[0].bias.assign(np.zeros(16, np.float32))
    _, run = fit_monitored(model, regression_data, tmp_path)
    steps, names, ratio = run.stat("update_ratio")
    bias = names.index(model.layers[0].bias.path)
    assert np.isnan(ratio[0, bias]) and run.stat("weight_norm")[2][0, bias] == 0
    assert np.isfinite(ratio[1, bias])


MODES = {
    "eager": {"run_eagerly": True},
    "function": {},
    "xla": {"jit_compile": True},
    "steps_per_execution": {"steps_per_execution": 3},
}


@pytest.fixture(scope="module")
def function_reference(tmp_path_factory, regression_data_module):
    _, run = fit_monitored(build_mlp(adam), regression_data_module,
                           tmp_path_factory.mktemp("ref"), epochs=2)
    return run


@pytest.fixture(scope="module")
def regression_data_module():
    rng = np.random.RandomState(0)
    x = rng.randn(256, 8).astype("float32")
    return x, (x @ rng.randn(8, 1)).astype("float32")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_compilation_mode_records_the_same_values(mode, tmp_path, regression_data_module, function_reference):
    model = build_mlp(adam, **MODES[mode])
    _, run = fit_monitored(model, regression_data_module, tmp_path, epochs=2)
    for stat in ("grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "dead_fraction",
                 "saturation_fraction", "global_grad_norm"):
        steps, _, values = run.stat(stat)
        ref_steps, _, ref_values = function_reference.stat(stat)
        np.testing.assert_array_equal(steps, ref_steps)
        np.testing.assert_allclose(values, ref_values, rtol=2e-5, atol=1e-7, err_msg=f"{mode}: {stat}")


@pytest.mark.parametrize("steps_per_execution,every", [(4, 3), (2, 1), (1, 5)])
def test_every_with_steps_per_execution_records_each_steps_own_values(
    steps_per_execution, every, tmp_path, regression_data_module, function_reference
):
    model = build_mlp(adam, steps_per_execution=steps_per_execution)
    _, run = fit_monitored(model, regression_data_module, tmp_path, epochs=2, every=every)
    steps, _, values = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, np.arange(0, 8, every))
    np.testing.assert_allclose(values, function_reference.stat("grad_norm")[2][::every], rtol=2e-5)


def test_xla_with_every_records_each_recorded_steps_update(tmp_path, regression_data_module, function_reference):
    # Under XLA the update is not branched around (see Tap._can_branch_around_apply): the
    # ratio is measured every step and kept on record steps only.
    model = build_mlp(adam, jit_compile=True)
    _, run = fit_monitored(model, regression_data_module, tmp_path, epochs=2, every=3)
    for stat in ("grad_norm", "weight_norm", "update_ratio"):
        steps, _, values = run.stat(stat)
        np.testing.assert_array_equal(steps, [0, 3, 6])
        np.testing.assert_allclose(values, function_reference.stat(stat)[2][::3], rtol=2e-5, atol=1e-7, err_msg=stat)


@pytest.mark.parametrize("every", [1, 3])
def test_mirrored_strategy_equals_single_device(every, tmp_path, regression_data_module, function_reference,
                                                two_cpu_strategy):
    model = build_mlp(adam, strategy=two_cpu_strategy)
    _, run = fit_monitored(model, regression_data_module, tmp_path, epochs=2, every=every)
    for stat in ("grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "dead_fraction",
                 "saturation_fraction", "global_grad_norm"):
        steps, _, values = run.stat(stat)
        np.testing.assert_array_equal(steps, function_reference.stat(stat)[0][::every])
        np.testing.assert_allclose(values, function_reference.stat(stat)[2][::every], rtol=1e-5, atol=1e-7,
                                   err_msg=stat)


@pytest.mark.parametrize("every", [1, 3])
def test_mixed_float16_values_are_unscaled(every, tmp_path, regression_data_module, function_reference):
    keras.mixed_precision.set_global_policy("mixed_float16")
    # A scale of 2**8 rather than the default 2**15 keeps step 0 from overflowing (a skipped step
    # would shift the steps against the reference); a scaled value would still be off 256-fold.
    model = build_mlp(lambda: keras.optimizers.LossScaleOptimizer(adam(), initial_scale=2**8))
    _, run = fit_monitored(model, regression_data_module, tmp_path, epochs=2, every=every)
    steps, _, values = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, np.arange(0, 8, every))
    reference = function_reference.stat("grad_norm")[2][steps]
    # The loss scale starts at 32768: scaled values would be off by that factor.
    np.testing.assert_allclose(values, reference, rtol=2e-2)


class ActivationProbe(keras.callbacks.Callback):
    """Before each step, the activations of `layer_names` on that step's batch (weights not yet updated)."""

    def __init__(self, x, layer_names):
        super().__init__()
        self.x, self.layer_names, self.outputs = x, layer_names, []

    def on_train_batch_begin(self, batch, logs=None):
        probe = keras.Model(self.model.inputs[0], [self.model.get_layer(n).output for n in self.layer_names])
        self.outputs.append([o.numpy() for o in probe(self.x[batch * BATCH:(batch + 1) * BATCH])])


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_dead_and_saturation_fractions_match_numpy_on_the_steps_activations(mode, tmp_path):
    """Saturation and dead units of the recorded step's own batch."""
    keras.utils.set_random_seed(1)
    # Biases from 0 down to -4: the first units fire on most samples, the last on none.
    graded = keras.initializers.Constant(np.linspace(0.0, -4.0, 32))
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu", bias_initializer=graded, name="relu"),
        keras.layers.Dense(16, activation="sigmoid", kernel_initializer=keras.initializers.RandomNormal(0, 2),
                           name="sigmoid"),
        keras.layers.Dense(16, activation="tanh", kernel_initializer=keras.initializers.RandomNormal(0, 2),
                           name="tanh"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse", **MODES[mode])
    rng = np.random.RandomState(0)
    x = rng.randn(9 * BATCH, 8).astype("float32")
    y = rng.randn(9 * BATCH, 1).astype("float32")
    probe = ActivationProbe(x, ["relu", "sigmoid", "tanh"])
    every = 3
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[probe, keras_vg.GradientMonitor(tmp_path, every=every, verbose=0)])
    run = keras_vg.read_run(tmp_path)

    steps, names, saturation = run.stat("saturation_fraction")
    np.testing.assert_array_equal(steps, [0, 3, 6])
    assert names == ["sigmoid", "tanh"]
    for row, step in enumerate(steps):
        sigmoid, tanh = probe.outputs[step][1], probe.outputs[step][2]
        expected = [np.mean((sigmoid < 0.01) | (sigmoid > 0.99)), np.mean(np.abs(tanh) > 0.99)]
        np.testing.assert_allclose(saturation[row], expected, atol=1e-6)
    assert 0 < saturation.min() and saturation.max() < 1  # neither count is trivially 0 or all

    steps, names, dead = run.stat("dead_fraction")
    assert names == ["relu"]
    for row, step in enumerate(steps):
        fired = np.any(probe.outputs[step][0] > 0, axis=0)
        np.testing.assert_allclose(dead[row, 0], np.mean(~fired), atol=1e-6)
    assert 0 < dead.min() and dead.max() < 1


def test_layer_called_inside_the_models_own_loop_is_left_out_with_a_warning(tmp_path, regression_data):
    class Looped(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(8, activation="sigmoid", name="looped")
            self.head = keras.layers.Dense(1)

        def call(self, x):
            _, h = tf.while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, self.inner(h)), (0, x))
            return self.head(h)

    model = Looped()
    model.compile(optimizer="sgd", loss="mse")
    model(regression_data[0][:1])
    with pytest.warns(UserWarning, match="'looped'.*control flow"):
        _, run = fit_monitored(model, regression_data, tmp_path)
    assert len(run.stat("grad_norm")[0]) == 4  # the rest is recorded
    assert np.all(np.isnan(run.stat("saturation_fraction")[2]))


class CountingSequential(keras.Sequential):
    """Counts how often Keras traces (or, eagerly, runs) the train step."""

    traces = 0

    def train_step(self, data):
        CountingSequential.traces += 1
        return super().train_step(data)


def test_two_functions_each_traced_once_across_fits(tmp_path, regression_data):
    # The design needs exactly two: Keras's own for steps that record nothing, and the
    # instrumented one for record steps. A second fit with the same monitor traces neither again.
    keras.utils.set_random_seed(0)
    model = CountingSequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    monitor = keras_vg.GradientMonitor(tmp_path, every=3, verbose=0)
    CountingSequential.traces = 0
    for _ in range(2):
        model.fit(*regression_data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    # Two traces of the train step in all: the instrumented function's, and Keras's own.
    assert (monitor.tap.trace_count, CountingSequential.traces) == (1, 2)
    np.testing.assert_array_equal(keras_vg.read_run(tmp_path).stat("grad_norm")[0], np.arange(0, 16, 3))


@pytest.mark.parametrize("mode,every", [("function", 1), ("function", 3), ("xla", 1), ("xla", 3)])
def test_monitoring_never_changes_training(mode, every, tmp_path, regression_data):
    weights = []
    for monitored in (True, False):
        model = build_mlp(adam, **MODES[mode])
        callbacks = [keras_vg.GradientMonitor(tmp_path, every=every, verbose=0)] if monitored else []
        model.fit(*regression_data, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append([v.numpy() for v in model.weights])
    for with_monitor, without in zip(*weights):
        if mode == "function":
            np.testing.assert_array_equal(with_monitor, without)  # bit for bit
        else:
            # XLA may fuse the instrumented function differently: float32 rounding, after 12 steps.
            np.testing.assert_allclose(with_monitor, without, rtol=1e-5, atol=1e-6)
