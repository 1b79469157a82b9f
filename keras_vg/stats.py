"""Pure tensor maths for gradient-health statistics. No state, no Keras.

Every function here is safe inside `tf.function`, under XLA and in a replica
context: it only builds reductions over the tensors it is given.
"""

import tensorflow as tf


def dense_values(grad):
    """Returns what the statistics see of a gradient, as float32.

    Embedding gradients arrive as `tf.IndexedSlices`; DESIGN.md counts their
    values only.
    """
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    return values if values.dtype == tf.float32 else tf.cast(values, tf.float32)


def squared_norms(tensors):
    """Returns the sum of squares of each tensor, as a float32 vector.

    One fused op per tensor (`l2_loss`), which is all a step that records
    nothing but non-finite counts pays.

    Args:
        tensors: A list of float32 tensors.

    Returns:
        A float32 vector with one entry per tensor.

    Example:

    >>> squared_norms([tf.constant([3.0, 4.0]), tf.constant([1.0])]).numpy().tolist()
    [25.0, 1.0]
    """
    return tf.stack([2.0 * tf.nn.l2_loss(t) for t in tensors])


def nonfinite_counts(tensors, sums_of_squares):
    """Counts NaN/inf values per tensor, scanning only when some sum is not finite.

    Args:
        tensors: A list of float32 tensors.
        sums_of_squares: Their `squared_norms`; a NaN or inf in a tensor
            makes its sum non-finite, so an all-finite vector means no count
            is needed.

    Returns:
        A float32 vector of counts.
    """

    def count():
        return tf.stack([
            tf.math.count_nonzero(tf.logical_not(tf.math.is_finite(t)), dtype=tf.float32) for t in tensors
        ])

    return tf.cond(
        tf.reduce_all(tf.math.is_finite(sums_of_squares)), lambda: tf.zeros_like(sums_of_squares), count
    )


def norms_and_max_abs(tensors, sums_of_squares, nonfinite):
    """Returns the L2 norm and the largest absolute value of each tensor.

    The norm is `sqrt` of the sum of squares, except when a sum overflows or
    underflows float32: then every norm is recomputed as
    `max_abs · ‖t / max_abs‖`, so a gradient of 1e20 reads 1e20 rather than
    inf and a vanishing one of 1e-25 reads 1e-25 rather than 0.

    Args:
        tensors: A list of float32 tensors.
        sums_of_squares: Their `squared_norms`.
        nonfinite: Their `nonfinite_counts`: a tensor holding NaN or inf keeps
            its non-finite norm.

    Returns:
        A tuple `(norms, max_abs)` of float32 vectors.

    Example:

    >>> t = [tf.constant([3.0, -4.0])]
    >>> sums = squared_norms(t)
    >>> [v.numpy().tolist() for v in norms_and_max_abs(t, sums, nonfinite_counts(t, sums))]
    [[5.0], [4.0]]
    """
    max_abs = tf.stack([tf.reduce_max(tf.abs(t)) if t.shape.num_elements() != 0 else 0.0 for t in tensors])

    def rescaled():
        scale = tf.where(max_abs > 0, max_abs, 1.0)
        norms = tf.stack([tf.sqrt(2.0 * tf.nn.l2_loss(t / s)) for t, s in zip(tensors, tf.unstack(scale))])
        return tf.where(nonfinite > 0, tf.sqrt(sums_of_squares), max_abs * norms)

    # Below 1e-20 the squares of elements under ~1e-19 are lost to float32.
    exact = (tf.math.is_finite(sums_of_squares) & (sums_of_squares > 1e-20)) | (max_abs == 0)
    norms = tf.cond(tf.reduce_all(exact), lambda: tf.sqrt(sums_of_squares), rescaled)
    return norms, max_abs


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


def update_ratios(before, after):
    """Returns `(‖before‖, ‖after − before‖ / ‖before‖)` per variable.

    The ratio is NaN where ‖before‖ = 0 (a zero-initialised bias at its first
    step): undefined, which readers tell apart from a non-finite gradient by
    looking at the weight norm.

    Args:
        before: A list of the variables' values before the update.
        after: Their values after the update.

    Returns:
        A tuple `(weight_norms, ratios)` of float32 vectors.

    Example:

    >>> norms, ratios = update_ratios([tf.constant([3.0, 4.0])], [tf.constant([3.0, 4.5])])
    >>> norms.numpy().tolist(), [round(r, 6) for r in ratios.numpy().tolist()]
    ([5.0], [0.1])
    """
    before = [tf.cast(b, tf.float32) for b in before]
    weight_norms = tf.sqrt(squared_norms(before))
    deltas = tf.sqrt(squared_norms([tf.cast(a, tf.float32) - b for a, b in zip(after, before)]))
    safe = tf.where(weight_norms > 0, weight_norms, 1.0)
    return weight_norms, tf.where(weight_norms > 0, deltas / safe, float("nan"))


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
    return tf.math.count_nonzero(outputs > 0, axis=axes, dtype=tf.float32)


def saturated_count(outputs, kind, epsilon):
    """Counts activations within `epsilon` of their asymptotes.

    Args:
        outputs: Activations of a sigmoid or tanh layer.
        kind: `"sigmoid"` (asymptotes 0 and 1) or `"tanh"` (−1 and 1).
        epsilon: Distance to an asymptote that counts as saturated.

    Returns:
        `(saturated, total)` as float32 scalars.
    """
    centre = 0.5 if kind == "sigmoid" else 0.0
    half_range = 0.5 if kind == "sigmoid" else 1.0
    y = outputs - tf.constant(centre, outputs.dtype) if centre else outputs
    saturated = tf.abs(y) > tf.constant(half_range - epsilon, outputs.dtype)
    total = tf.cast(tf.size(outputs), tf.float32)
    return tf.math.count_nonzero(saturated, dtype=tf.float32), total
