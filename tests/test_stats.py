"""Pure statistics against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_vg import stats


@pytest.mark.parametrize("values", [
    np.array([3.0, -4.0]),
    np.random.RandomState(0).randn(7, 5) * 1e-20,
    np.random.RandomState(1).randn(300) * 1e25,  # sum of squares overflows float32
])
def test_gradient_stats_match_numpy(values):
    norm, max_abs, nonfinite = stats.gradient_stats(tf.constant(values, tf.float32))
    values32 = values.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(float(norm), np.linalg.norm(values32), rtol=1e-5)
    assert float(max_abs) == pytest.approx(np.max(np.abs(values32)), rel=1e-6)
    assert float(nonfinite) == 0


def test_gradient_stats_count_nonfinite():
    g = tf.constant([1.0, np.nan, np.inf, -np.inf, 2.0])
    norm, _, nonfinite = stats.gradient_stats(g)
    assert float(nonfinite) == 3
    assert not np.isfinite(float(norm))


def test_gradient_stats_of_indexed_slices_use_values():
    values = tf.constant([[3.0, 0.0], [0.0, 4.0]])
    grad = tf.IndexedSlices(values, tf.constant([0, 5]), tf.constant([10, 2]))
    norm, max_abs, _ = stats.gradient_stats(grad)
    assert float(norm) == pytest.approx(5.0)
    assert float(max_abs) == pytest.approx(4.0)


def test_global_norm_is_norm_of_norms_even_when_huge():
    norms = tf.constant([3e30, 4e30])
    assert float(stats.global_norm(norms)) == pytest.approx(5e30, rel=1e-6)
    assert float(stats.global_norm(tf.constant([3.0, 4.0]))) == pytest.approx(5.0)


def test_update_ratio_and_undefined_ratio():
    before = np.array([[1.0, 2.0], [2.0, 4.0]], np.float32)
    after = before - 0.01 * np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    weight_norm, ratio = stats.update_ratio(tf.constant(before), tf.constant(after))
    assert float(weight_norm) == pytest.approx(np.linalg.norm(before), rel=1e-6)
    assert float(ratio) == pytest.approx(np.linalg.norm(after - before) / np.linalg.norm(before), rel=1e-5)
    _, undefined = stats.update_ratio(tf.zeros([3]), tf.ones([3]))
    assert np.isnan(float(undefined))


def test_fired_counts_per_unit_and_channel_axis():
    outputs = np.array([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 3.0]]], np.float32)  # [B, H, C]
    np.testing.assert_array_equal(stats.fired_counts(tf.constant(outputs), -1).numpy(), [0, 3])
    np.testing.assert_array_equal(stats.fired_counts(tf.constant(outputs), 1).numpy(), [2, 1])


def test_saturated_count_for_sigmoid_and_tanh():
    y = tf.constant([0.001, 0.5, 0.999, 0.2])
    saturated, total = stats.saturated_count(y, "sigmoid", 0.01)
    assert (float(saturated), float(total)) == (2.0, 4.0)
    saturated, _ = stats.saturated_count(tf.constant([-0.995, 0.0, 0.995, 0.5]), "tanh", 0.01)
    assert float(saturated) == 2.0
