"""weight_norm and update_ratio, observed or copied, against weights read around each step."""

import warnings

import keras
import numpy as np
import pytest

import keras_vg
from keras_vg import _keras_compat, weight_updates

pytestmark = pytest.mark.fit

STEPS = 3
# The stored weights are rounded to float32 after each update, so the change read from them
# differs from the update applied by up to half an ulp per element: ≤ eps/2 · ‖w‖.
RATIO_ATOL = float(np.finfo(np.float32).eps)


class WeightsAroundSteps(keras.callbacks.Callback):
    """The independent reference: every trainable variable as numpy before and after each step."""

    def on_train_begin(self, logs=None):
        self.before, self.after = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([v.numpy().astype(np.float64) for v in self.model.trainable_variables])

    def on_train_batch_end(self, batch, logs=None):
        self.after.append([v.numpy().astype(np.float64) for v in self.model.trainable_variables])

    def expected(self):
        norms = np.array([[np.linalg.norm(w) for w in step] for step in self.before])
        changes = np.array([[np.linalg.norm(a - b) for a, b in zip(after, before)]
                            for before, after in zip(self.before, self.after)])
        return norms, changes / norms


def dense_model(optimizer, kernel_constraint=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", bias_initializer="ones", kernel_constraint=kernel_constraint),
        keras.layers.Dense(1, bias_initializer="ones"),
    ])
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.RandomState(0)
    return model, (rng.randn(16 * STEPS, 6).astype("float32"), rng.randn(16 * STEPS, 1).astype("float32"))


def embedding_model(optimizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4),
                              keras.layers.Flatten(), keras.layers.Dense(1, bias_initializer="ones")])
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.RandomState(0)
    # Few tokens, long rows: a batch's gradient names the same embedding rows many times.
    return model, (rng.randint(0, 3, size=(16 * STEPS, 5)).astype("int32"), rng.randn(16 * STEPS, 1).astype("float32"))


def recorded_and_expected(tmp_path, model, data):
    reference = WeightsAroundSteps()
    monitor = keras_vg.GradientMonitor(str(tmp_path), every=1, verbose=0)
    model.fit(*data, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, reference])
    run = keras_vg.read_run(str(tmp_path))
    _, _, norms = run.stat("weight_norm")
    _, _, ratios = run.stat("update_ratio")
    return monitor, (norms, ratios), reference.expected()


OPTIMIZERS = {
    "SGD": lambda: keras.optimizers.SGD(0.05),
    "SGD momentum nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "Adam": lambda: keras.optimizers.Adam(0.01),
    "Adam amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "Nadam": lambda: keras.optimizers.Nadam(0.01),
    "Adamax": lambda: keras.optimizers.Adamax(0.01),
    "Adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "Adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "RMSprop": lambda: keras.optimizers.RMSprop(0.01),
    "RMSprop momentum centered": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "Lion": lambda: keras.optimizers.Lion(0.01),
    "Lamb": lambda: keras.optimizers.Lamb(0.01),
    "Adafactor": lambda: keras.optimizers.Adafactor(0.05),
    "Ftrl": lambda: keras.optimizers.Ftrl(0.05),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_observed_updates_of_builtin_optimizers_match_the_weights(tmp_path, name):
    model, data = dense_model(OPTIMIZERS[name]())
    monitor, (norms, ratios), (expected_norms, expected_ratios) = recorded_and_expected(tmp_path, model, data)
    assert all(monitor.tap._update_meter.observed), "this optimizer's updates should be observed, not copied"
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, expected_ratios, rtol=1e-4, atol=RATIO_ATOL)


@pytest.mark.parametrize("case", ["AdamW weight decay", "kernel constraint", "subclassed optimizer"])
def test_updates_keras_makes_elsewhere_are_copied_and_exact(tmp_path, case):
    class MySGD(keras.optimizers.SGD):
        pass

    optimizer = {"AdamW weight decay": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.5),
                 "kernel constraint": lambda: keras.optimizers.Adam(0.01),
                 "subclassed optimizer": lambda: MySGD(0.05)}[case]()
    constraint = keras.constraints.MaxNorm(0.5) if case == "kernel constraint" else None
    model, data = dense_model(optimizer, kernel_constraint=constraint)
    monitor, (norms, ratios), (expected_norms, expected_ratios) = recorded_and_expected(tmp_path, model, data)
    observed = monitor.tap._update_meter.observed
    if case == "kernel constraint":
        assert observed == [False, True, True, True]  # only the constrained kernel is copied
    elif case == "AdamW weight decay":
        assert not any(observed)
    else:
        assert not any(observed)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, expected_ratios, rtol=1e-4, atol=RATIO_ATOL)


def test_sparse_updates_with_repeated_rows_are_summed_before_the_norm(tmp_path):
    model, data = embedding_model(keras.optimizers.SGD(0.5))
    monitor, (norms, ratios), (expected_norms, expected_ratios) = recorded_and_expected(tmp_path, model, data)
    assert all(monitor.tap._update_meter.observed)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, expected_ratios, rtol=1e-4, atol=RATIO_ATOL)


class WarmUpFromZero(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        return 0.05 * keras.ops.cast(step, "float32")


def test_plain_sgd_update_norm_is_the_learning_rate_times_the_recorded_gradient_norm(tmp_path, monkeypatch):
    """SGD's Δw = −lr·g: ‖Δw‖ is |lr|·‖g‖ from the record, with no pass over the update; a learning rate of 0
    (a warm-up's first step) reads a ratio of 0, as the weights do."""
    from_gradient = []
    original = weight_updates._scaled_gradient

    def spy(value, row_of):
        match = original(value, row_of)
        from_gradient.append(match is not None)
        return match

    monkeypatch.setattr(weight_updates, "_scaled_gradient", spy)
    model, data = dense_model(keras.optimizers.SGD(WarmUpFromZero()))
    monitor, (norms, ratios), (expected_norms, expected_ratios) = recorded_and_expected(tmp_path, model, data)
    assert from_gradient == [True] * 4, "every dense update should take its norm from the gradient's"
    assert np.all(ratios[0] == 0) and np.all(ratios[1:] > 0)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, expected_ratios, rtol=1e-4, atol=RATIO_ATOL)


def test_loss_scaled_update_is_observed_inside_its_conditional(tmp_path):
    model, data = dense_model(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)))
    monitor, (norms, ratios), (expected_norms, expected_ratios) = recorded_and_expected(tmp_path, model, data)
    assert all(monitor.tap._update_meter.observed)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    np.testing.assert_allclose(ratios, expected_ratios, rtol=1e-4, atol=RATIO_ATOL)


def test_an_update_not_seen_exactly_once_reads_nan_with_one_warning(tmp_path, monkeypatch):
    class TwoStepSGD(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            half = keras.ops.multiply(gradient, learning_rate / 2)
            self.assign_sub(variable, half)
            self.assign_sub(variable, half)

    monkeypatch.setattr(_keras_compat, "update_is_observable", lambda optimizer, variable: True)
    model, data = dense_model(TwoStepSGD(0.05))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, (norms, ratios), (expected_norms, _) = recorded_and_expected(tmp_path, model, data)
    messages = [str(w.message) for w in caught if "could not observe" in str(w.message)]
    assert len(messages) == 1 and "dense/kernel" in messages[0]
    assert np.isnan(ratios).all()
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)


def test_only_builtin_optimizers_without_side_updates_are_observable():
    model, _ = dense_model(keras.optimizers.Adam(0.01), kernel_constraint=keras.constraints.NonNeg())
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    assert not _keras_compat.update_is_observable(model.optimizer, kernel)
    assert _keras_compat.update_is_observable(model.optimizer, bias)
    decaying = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    decaying.exclude_from_weight_decay(var_names=["bias"])
    decaying.build([kernel, bias])
    assert not _keras_compat.update_is_observable(decaying, kernel)
    assert _keras_compat.update_is_observable(decaying, bias)
