"""Pure statistics against numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vg import stats
from keras_vg.layers import Gate


def gradient_stats(values):
    tensors = [stats.dense_values(tf.constant(v)) if not isinstance(v, tf.IndexedSlices) else stats.dense_values(v)
               for v in values]
    sums = stats.squared_norms(tensors)
    nonfinite = stats.nonfinite_counts(tensors, sums)
    norms, max_abs = stats.norms_and_max_abs(tensors, sums, nonfinite)
    return norms.numpy(), max_abs.numpy(), nonfinite.numpy()


# 1e-20 underflows and 1e25 overflows sums of squares; at 1e-16 squares are normal but tiny.
@pytest.mark.parametrize("scale", [1.0, 1e-16, 1e-20, 1e25])
def test_gradient_stats_match_numpy(scale):
    rng = np.random.RandomState(0)
    values = [(rng.randn(7, 5) * scale).astype(np.float32), (rng.randn(300) * scale).astype(np.float32),
              np.array([3.0, -4.0], np.float32)]
    norms, max_abs, nonfinite = gradient_stats(values)
    np.testing.assert_allclose(norms, [np.linalg.norm(v.astype(np.float64)) for v in values], rtol=1e-5)
    np.testing.assert_allclose(max_abs, [np.abs(v).max() for v in values], rtol=1e-6)
    np.testing.assert_array_equal(nonfinite, 0)


def test_only_tensors_whose_squares_underflow_are_rescaled():
    rng = np.random.RandomState(1)
    values = [(rng.randn(50) * 1e-21).astype(np.float32), (rng.randn(50)).astype(np.float32),
              np.array([1e-19, 1e-25], np.float32)]
    norms, _, _ = gradient_stats(values)
    np.testing.assert_allclose(norms, [np.linalg.norm(v.astype(np.float64)) for v in values], rtol=1e-5)


def test_gradient_stats_count_nonfinite_per_tensor():
    norms, _, nonfinite = gradient_stats([np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32),
                                          np.array([3.0, 4.0], np.float32)])
    np.testing.assert_array_equal(nonfinite, [3, 0])
    assert not np.isfinite(norms[0]) and norms[1] == pytest.approx(5.0)


def test_gradient_stats_of_indexed_slices_use_values():
    grad = tf.IndexedSlices(tf.constant([[3.0, 0.0], [0.0, 4.0]]), tf.constant([0, 5]), tf.constant([10, 2]))
    norms, max_abs, _ = gradient_stats([grad])
    assert norms[0] == pytest.approx(5.0) and max_abs[0] == pytest.approx(4.0)


def test_float16_gradients_are_measured_in_float32():
    norms, _, _ = gradient_stats([np.full(4, 300.0, np.float16)])  # 4·300² overflows float16
    assert norms[0] == pytest.approx(600.0)


def test_global_norm_is_norm_of_norms_even_when_huge():
    norms = tf.constant([3e30, 4e30])
    assert float(stats.global_norm(norms)) == pytest.approx(5e30, rel=1e-6)
    assert float(stats.global_norm(tf.constant([3.0, 4.0]))) == pytest.approx(5.0)


def test_update_ratios_and_undefined_ratio():
    before = np.array([[1.0, 2.0], [2.0, 4.0]], np.float32)
    after = before - 0.01 * np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    weight_norms, ratios = stats.update_ratios([tf.constant(before), tf.zeros([3])], [tf.constant(after), tf.ones([3])])
    assert weight_norms.numpy()[0] == pytest.approx(np.linalg.norm(before), rel=1e-6)
    assert ratios.numpy()[0] == pytest.approx(np.linalg.norm(after - before) / np.linalg.norm(before), rel=1e-5)
    assert weight_norms.numpy()[1] == 0 and np.isnan(ratios.numpy()[1])


def test_passing_units_per_unit_and_channel_axis():
    outputs = np.array([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 2.0], [-1.0, -3.0]]], np.float32)  # [B, H, C]
    for axis in (-1, 1):
        expected = (np.moveaxis(outputs, axis, -1) > 0).reshape(-1, 2).any(axis=0)
        np.testing.assert_array_equal(stats.passing_units(tf.constant(outputs), Gate(0.0, None), axis).numpy(),
                                      expected)
    np.testing.assert_array_equal(stats.passing_units(tf.constant(outputs), Gate(0.0, None), 1).numpy(), [1, 0])


SELU_SCALE, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772


@pytest.mark.parametrize("layer,outputs", [
    # ELU's slope below 0 is y + 1: a unit at -0.9995 passes 5e-4 of the positive slope, at -0.99 1e-2.
    (keras.layers.Activation("elu"), [[-0.9995, -0.99], [-0.9999, -0.5]]),
    # SELU's slope below 0 is y + 1.7581, against 1.0507 above.
    (keras.layers.Activation("selu"), [[-1.7575, -1.70], [-1.758, -1.0]]),
    (keras.layers.Activation("relu6"), [[6.0, 5.9], [0.0, 0.0]]),
    (keras.layers.ReLU(max_value=2.0), [[2.0, 1.0], [0.0, 0.0]]),
], ids=["elu", "selu", "relu6", "relu_max_value"])
def test_a_unit_passes_gradient_where_its_activations_slope_is_not_negligible(layer, outputs):
    from keras_vg.layers import DEAD_UNIT_SLOPE, activation_name, dead_unit_gate

    outputs = np.array(outputs, np.float32)
    name = activation_name(layer)
    # The reference: the activation's own slope, by autodiff, at inputs that give these outputs.
    if name == "elu":
        x = np.where(outputs > 0, outputs, np.log1p(outputs))
    elif name == "selu":
        x = np.where(outputs > 0, outputs / SELU_SCALE, np.log1p(outputs / (SELU_SCALE * SELU_ALPHA)))
    else:  # below 0 or at the top, past the bend
        top = 6.0 if name == "relu6" else 2.0
        x = np.where(outputs <= 0, -1.0, np.where(outputs >= top, top + 1.0, outputs))
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    np.testing.assert_allclose(y.numpy(), outputs, atol=2e-4)
    positive_slope = SELU_SCALE if name == "selu" else 1.0
    expected = (tape.gradient(y, x).numpy() > DEAD_UNIT_SLOPE * positive_slope).any(axis=0)
    marks = stats.passing_units(tf.constant(outputs), dead_unit_gate(layer)).numpy()
    np.testing.assert_array_equal(marks.astype(bool), expected)
    assert expected.any() and not expected.all()  # each case holds a dead and a live unit


def test_leaky_units_are_never_dead():
    from keras_vg.layers import dead_unit_gate

    for layer in (keras.layers.LeakyReLU(), keras.layers.PReLU(), keras.layers.ReLU(negative_slope=0.1),
                  keras.layers.Dense(2, activation="leaky_relu"), keras.layers.Dense(2, activation="gelu")):
        assert dead_unit_gate(layer) is None, layer


def test_saturated_count_for_sigmoid_and_tanh():
    y = tf.constant([0.001, 0.5, 0.999, 0.2])
    saturated, total = stats.saturated_count(y, "sigmoid", 0.01)
    assert (float(saturated), float(total)) == (2.0, 4.0)
    saturated, _ = stats.saturated_count(tf.constant([-0.995, 0.0, 0.995, 0.5]), "tanh", 0.01)
    assert float(saturated) == 2.0
