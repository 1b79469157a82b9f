"""Pure tensor maths for gradient-health statistics. No state, no Keras.

Every function here is safe inside `tf.function`, under XLA and in a replica
context: it only builds reductions over the tensors it is given.
"""

import tensorflow as tf


def _dense_values(grad):
    # Embedding gradients arrive as IndexedSlices; DESIGN.md counts their values only.
    if isinstance(grad, tf.IndexedSlices):
        return grad.values
    return grad


def gradient_stats(grad):
    """Returns `(norm, max_abs, nonfinite_count)` of one gradient, as float32 scalars.

    The norm is computed as `max_abs · ‖g / max_abs‖` only when the plain sum
    of squares overflows or underflows float32, so a gradient of 1e20 still
    reads 1e20 rather than inf and a vanishing one of 1e-25 reads 1e-25 rather
    than 0, while the common case costs two passes over the gradient.

    Args:
        grad: A gradient tensor or `tf.IndexedSlices`, any float dtype.

    Returns:
        A tuple of three float32 scalar tensors.

    Example:

    >>> [float(t) for t in gradient_stats(tf.constant([3.0, -4.0]))]
    [5.0, 4.0, 0.0]
    """
    g = tf.cast(_dense_values(grad), tf.float32)
    sum_squares = tf.reduce_sum(tf.square(g))
    max_abs = tf.reduce_max(tf.abs(g)) if g.shape.num_elements() != 0 else tf.constant(0.0)

    def robust():
        nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(g)), tf.float32))
        scale = tf.where(max_abs > 0, max_abs, 1.0)
        rescaled = max_abs * tf.sqrt(tf.reduce_sum(tf.square(g / scale)))
        norm = tf.where(nonfinite > 0, sum_squares, rescaled)
        return norm, nonfinite

    # Only a non-finite, overflowing or underflowing sum needs the extra passes.
    # Below 1e-20 the squares of elements under ~1e-19 are lost to float32.
    plain_is_exact = tf.logical_and(tf.math.is_finite(sum_squares), sum_squares > 1e-20)
    norm, nonfinite = tf.cond(
        plain_is_exact,
        lambda: (tf.sqrt(sum_squares), tf.constant(0.0)),
        robust,
    )
    return norm, max_abs, nonfinite


def global_norm(norms):
    """Returns the L2 norm over all gradients from their per-variable norms.

    Args:
        norms: A float32 vector of per-variable L2 norms.

    Returns:
        A float32 scalar.
    """
    peak = tf.reduce_max(norms)
    scale = tf.where(tf.logical_and(peak > 0, tf.math.is_finite(peak)), peak, 1.0)
    return scale * tf.sqrt(tf.reduce_sum(tf.square(norms / scale)))


def update_ratio(before, after):
    """Returns `(‖before‖, ‖after − before‖ / ‖before‖)` as float32 scalars.

    The ratio is NaN where ‖before‖ = 0 (a zero-initialised bias at its first
    step): undefined, which readers tell apart from a non-finite gradient by
    looking at the weight norm.

    Args:
        before: The variable's value before the update.
        after: Its value after the update.

    Returns:
        A tuple `(weight_norm, ratio)`.

    Example:

    >>> [float(t) for t in update_ratio(tf.constant([3.0, 4.0]), tf.constant([3.0, 4.5]))]
    [5.0, 0.1]
    """
    before = tf.cast(before, tf.float32)
    after = tf.cast(after, tf.float32)
    weight_norm = tf.norm(before)
    delta_norm = tf.norm(after - before)
    ratio = tf.where(weight_norm > 0, delta_norm / tf.where(weight_norm > 0, weight_norm, 1.0), float("nan"))
    return weight_norm, ratio


def fired_counts(outputs, unit_axis=-1):
    """Counts, per unit, the outputs above 0 in a batch of activations.

    Args:
        outputs: Activations of a ReLU-family layer.
        unit_axis: The axis of the units (channels). Defaults to `-1`.

    Returns:
        A float32 vector with one count per unit.
    """
    rank = outputs.shape.rank
    unit_axis = unit_axis % rank
    axes = [a for a in range(rank) if a != unit_axis]
    return tf.reduce_sum(tf.cast(outputs > 0, tf.float32), axis=axes)


def saturated_count(outputs, kind, epsilon):
    """Counts activations within `epsilon` of their asymptotes.

    Args:
        outputs: Activations of a sigmoid or tanh layer.
        kind: `"sigmoid"` (asymptotes 0 and 1) or `"tanh"` (−1 and 1).
        epsilon: Distance to an asymptote that counts as saturated.

    Returns:
        `(saturated, total)` as float32 scalars.
    """
    y = tf.cast(outputs, tf.float32)
    if kind == "sigmoid":
        saturated = tf.logical_or(y < epsilon, y > 1.0 - epsilon)
    else:
        saturated = tf.abs(y) > 1.0 - epsilon
    total = tf.cast(tf.size(y), tf.float32)
    return tf.reduce_sum(tf.cast(saturated, tf.float32)), total
