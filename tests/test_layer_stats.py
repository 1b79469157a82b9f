"""Per-layer statistics against the layers' own concatenated values."""

import numpy as np
import pytest

from keras_vg.layer_stats import by_layer, variable_layers

rng = np.random.RandomState(0)
LAYERS = ["a", "a", "b", "c", "c", "c"]


def raw_variables(steps=4):
    """Per step, one raw vector per variable, of assorted sizes and scales."""
    sizes = [30, 5, 12, 40, 3, 1]
    return [[rng.randn(size) * 10.0 ** rng.uniform(-3, 3) for size in sizes] for _ in range(steps)]


def per_layer(raw, reduce):
    return np.array([[reduce(np.concatenate([v for v, layer in zip(step, LAYERS) if layer == name]))
                      for name in ("a", "b", "c")] for step in raw])


@pytest.mark.parametrize("stat,per_variable,reduce", [
    ("grad_norm", np.linalg.norm, np.linalg.norm),
    ("weight_norm", np.linalg.norm, np.linalg.norm),
    ("grad_max_abs", lambda v: np.abs(v).max(), lambda v: np.abs(v).max()),
])
def test_a_layers_value_is_that_of_all_its_values_together(stat, per_variable, reduce):
    raw = raw_variables()
    values = np.array([[per_variable(v) for v in step] for step in raw])
    names, combined = by_layer(stat, LAYERS, values)
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(combined, per_layer(raw, reduce), rtol=1e-6)


def test_nonfinite_counts_add_up():
    raw = raw_variables()
    raw[1][0][[2, 5]] = np.nan
    raw[2][4][0] = np.inf
    values = np.array([[np.count_nonzero(~np.isfinite(v)) for v in step] for step in raw], np.float32)
    _, combined = by_layer("grad_nonfinite", LAYERS, values)
    np.testing.assert_array_equal(combined, per_layer(raw, lambda v: np.count_nonzero(~np.isfinite(v))))


def test_update_ratio_is_the_layers_change_over_its_norm():
    weights, changes = raw_variables(), raw_variables()
    ratios = np.array([[np.linalg.norm(d) / np.linalg.norm(w) for w, d in zip(ws, ds)]
                       for ws, ds in zip(weights, changes)])
    norms = np.array([[np.linalg.norm(w) for w in ws] for ws in weights])
    _, combined = by_layer("update_ratio", LAYERS, ratios, weight_norm=norms)
    expected = per_layer(changes, np.linalg.norm) / per_layer(weights, np.linalg.norm)
    np.testing.assert_allclose(combined, expected, rtol=1e-5)


def test_missing_values_are_left_out_and_an_empty_layer_reads_nan():
    values = np.array([[3.0, 4.0, np.nan, 1.0, np.nan, 2.0]])
    _, combined = by_layer("grad_norm", LAYERS, values)
    np.testing.assert_allclose(combined[0, [0, 2]], [5.0, np.sqrt(5.0)])
    assert np.isnan(combined[0, 1])


def test_huge_norms_do_not_overflow():
    _, combined = by_layer("grad_norm", ["a", "a"], np.array([[3e30, 4e30]], np.float32))
    assert combined[0, 0] == pytest.approx(5e30, rel=1e-6)


def test_layers_come_from_the_model_summary_or_else_the_path():
    summary = {"layers": [{"name": "dense", "variables": ["model/dense/kernel", "model/dense/bias"]}]}
    assert variable_layers(["model/dense/kernel", "model/dense/bias", "model/other/kernel"], summary) == [
        "dense", "dense", "model/other"]
    assert variable_layers(["x/kernel"], None) == ["x"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Received: stat='dead_fraction'"):
        by_layer("dead_fraction", ["a"], np.zeros((1, 1)))
    with pytest.raises(ValueError, match="pass `weight_norm`"):
        by_layer("update_ratio", ["a"], np.zeros((1, 1)))


@pytest.mark.fit
def test_run_by_layer_matches_the_layers_gradient_from_a_tape(tmp_path):
    import keras
    import tensorflow as tf

    import keras_vg

    def build():
        keras.utils.set_random_seed(0)
        # Biases start at 1: a zero bias's first ratio is undefined, and left out of its layer's.
        model = keras.Sequential([keras.Input((6,)),
                                  keras.layers.Dense(8, activation="tanh", bias_initializer="ones", name="hidden"),
                                  keras.layers.Dense(1, bias_initializer="ones", name="out")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    x = rng.randn(32, 6).astype("float32")
    y = rng.randn(32, 1).astype("float32")
    model = build()
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    run = keras_vg.read_run(tmp_path)
    steps, names, norms = run.stat("grad_norm", by="layer")
    assert names == ["hidden", "out"]
    reference = build()
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, reference(x, training=True))
    grads = tape.gradient(loss, reference.trainable_variables)
    expected = [np.linalg.norm(np.concatenate([g.numpy().ravel() for g in grads[:2]])),
                np.linalg.norm(np.concatenate([g.numpy().ravel() for g in grads[2:]]))]
    np.testing.assert_allclose(norms[0], expected, rtol=1e-5)
    # SGD's identity Δw = lr·g over the layer: its ratio at step 0 is lr·‖g_layer‖/‖w_layer‖.
    weights = [np.concatenate([v.numpy().ravel() for v in layer.trainable_variables]) for layer in reference.layers]
    _, _, ratios = run.stat("update_ratio", by="layer")
    np.testing.assert_allclose(ratios[0], [0.1 * e / np.linalg.norm(w) for e, w in zip(expected, weights)],
                               rtol=1e-4)
    with pytest.raises(ValueError, match='`by` must be "variable" or "layer"'):
        run.stat("grad_norm", by="layers")
