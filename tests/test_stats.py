"""Pure statistics against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_vg import stats


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


def test_fired_units_per_unit_and_channel_axis():
    outputs = np.array([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 2.0], [-1.0, -3.0]]], np.float32)  # [B, H, C]
    for axis in (-1, 1):
        expected = (np.moveaxis(outputs, axis, -1) > 0).reshape(-1, 2).any(axis=0)
        np.testing.assert_array_equal(stats.fired_units(tf.constant(outputs), axis).numpy(), expected)
    np.testing.assert_array_equal(stats.fired_units(tf.constant(outputs), 1).numpy(), [1, 0])


def test_saturated_count_for_sigmoid_and_tanh():
    y = tf.constant([0.001, 0.5, 0.999, 0.2])
    saturated, total = stats.saturated_count(y, "sigmoid", 0.01)
    assert (float(saturated), float(total)) == (2.0, 4.0)
    saturated, _ = stats.saturated_count(tf.constant([-0.995, 0.0, 0.995, 0.5]), "tanh", 0.01)
    assert float(saturated) == 2.0
