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


def global_norm_of(tensors):
    """Returns the L2 norm of all the tensors together: one fused reduction per tensor, nothing else.

    The one global-norm helper of keras-vg's TensorFlow code for gradients
    (AutoClip's; a `Tap` that has per-variable norms already combines them
    with `global_norm`). The weights' norm AutoClip takes on a clipping step
    is `clipping.policy.weights_norm`, in `keras.ops` for both backends. A NaN anywhere makes the result NaN,
    an inf makes it inf, and so do finite values whose squares overflow
    float32 (a norm past 1.8e19).

    Args:
        tensors: A non-empty list of float32 tensors.

    Returns:
        A float32 scalar.

    Example:

    >>> float(global_norm_of([tf.constant([3.0]), tf.constant([4.0])]))
    5.0
    """
    return tf.sqrt(2.0 * tf.add_n([tf.nn.l2_loss(t) for t in tensors]))


def squared_norms(tensors):
    """Returns the sum of squares of each tensor, as a float32 vector.

    One fused op per tensor (`l2_loss`), which is all a step that records
    nothing but non-finite counts pays. The factor 2 is applied once to the
    vector: graph ops cost about a microsecond each to run, whatever their
    size, and a step measures hundreds of tensors.

    Args:
        tensors: A list of float32 tensors.

    Returns:
        A float32 vector with one entry per tensor.

    Example:

    >>> squared_norms([tf.constant([3.0, 4.0]), tf.constant([1.0])]).numpy().tolist()
    [25.0, 1.0]
    """
    return 2.0 * tf.stack([tf.nn.l2_loss(t) for t in tensors])


def nonfinite_counts(tensors, sums_of_squares):
    """Counts NaN/inf values per tensor, scanning only when some sum is not finite.

    The scan sits in a `tf.cond`, which TensorFlow lowers outside XLA: a
    finite step pays a few dead nodes, not a second pass over the gradient.

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

    return tf.cond(tf.reduce_all(tf.math.is_finite(sums_of_squares)), lambda: tf.zeros_like(sums_of_squares), count)


def norms_and_max_abs(tensors, sums_of_squares, nonfinite):
    """Returns the L2 norm and the largest absolute value of each tensor.

    The norm is `sqrt` of the sum of squares, except for a tensor whose sum
    overflowed float32 or is so small that squares lost to underflow could
    matter: its norm is recomputed as `max_abs · ‖t / max_abs‖`, so a gradient
    of 1e20 reads 1e20 rather than inf and a vanishing one of 1e-25 reads
    1e-25 rather than 0. Only a step that has such a tensor pays for the
    second pass.

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
    max_abs = _max_abs(tensors)
    # Squares below float32's smallest normal (~1.2e-38) are flushed to zero. Their total
    # stays under 1e-7 of the sum while the sum exceeds size · 1.2e-31.
    static = [t.shape.num_elements() for t in tensors]
    if all(size is not None for size in static):
        sizes = tf.constant(static, tf.float32)  # no op per tensor when the shapes are known
    else:
        sizes = tf.stack([tf.cast(tf.size(t), tf.float32) for t in tensors])
    exact = (tf.math.is_finite(sums_of_squares) & (sums_of_squares > sizes * 1.2e-31)) | (max_abs == 0) | (
        nonfinite > 0)
    plain = tf.sqrt(sums_of_squares)

    def rescaled():
        # One more pass over every tensor, in the rare step that needs it: a branch per
        # tensor costs more to trace and to run than the pass it saves.
        scale = tf.where(max_abs > 0, max_abs, 1.0)
        again = scale * tf.sqrt(2.0 * tf.stack([tf.nn.l2_loss(t / scale[i]) for i, t in enumerate(tensors)]))
        return tf.where(exact, plain, again)

    norms = tf.cond(tf.reduce_all(exact), lambda: plain, rescaled)
    return norms, max_abs


def _max_abs(tensors):
    # A maximum and a minimum rather than abs() then a maximum: abs() would allocate a
    # copy of the gradient, which costs more than reading it twice. They are combined
    # on the stacked vectors, in two ops rather than two per tensor.
    empty = tf.constant(0.0)
    maxima = tf.stack([tf.reduce_max(t) if t.shape.num_elements() != 0 else empty for t in tensors])
    minima = tf.stack([tf.reduce_min(t) if t.shape.num_elements() != 0 else empty for t in tensors])
    return tf.maximum(maxima, -minima)


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
    changes = tf.sqrt(squared_norms([tf.cast(a, tf.float32) - b for a, b in zip(after, before)]))
    return weight_norms, change_ratios(weight_norms, changes)


def change_ratios(weight_norms, change_norms):
    """Returns `change_norms / weight_norms`, NaN where a weight norm is 0.

    Args:
        weight_norms: A float32 vector of ‖w‖ before the update.
        change_norms: A float32 vector of ‖Δw‖.

    Returns:
        A float32 vector.

    Example:

    >>> change_ratios(tf.constant([2.0, 0.0]), tf.constant([1.0, 1.0])).numpy().tolist()
    [0.5, nan]
    """
    safe = tf.where(weight_norms > 0, weight_norms, 1.0)
    return tf.where(weight_norms > 0, change_norms / safe, float("nan"))


def passing_units(outputs, gate, unit_axis=-1):
    """Marks, per unit, whether any output in a batch of activations passes gradient.

    One reduction over the batch (two for a gate bounded on both sides). A
    unit marked 0 passes no gradient on any sample: it is dead on this batch.

    Args:
        outputs: Activations of a layer.
        gate: A `keras_vg.layers.Gate`: outputs strictly between its `low`
            and `high` (None: unbounded) pass gradient.
        unit_axis: The axis of the units (channels). Defaults to `-1`.

    Returns:
        A float32 vector with one entry per unit: 1.0 if it passed gradient,
        else 0.0.

    Example:

    >>> from keras_vg.layers import Gate
    >>> passing_units(tf.constant([[0.0, 2.0], [0.0, -1.0]]), Gate(0.0, None)).numpy().tolist()
    [0.0, 1.0]
    """
    rank = outputs.shape.rank
    unit_axis = unit_axis % rank
    axes = [a for a in range(rank) if a != unit_axis]
    low = tf.constant(gate.low, outputs.dtype)
    if gate.high is None:
        passing = tf.reduce_max(outputs, axis=axes) > low
    else:
        inside = tf.logical_and(outputs > low, outputs < tf.constant(gate.high, outputs.dtype))
        passing = tf.reduce_any(inside, axis=axes)
    return tf.cast(passing, tf.float32)


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
    # (y − centre)² > (half_range − ε)²: one fewer pass than |y − centre|.
    squares = tf.math.squared_difference(outputs, tf.constant(centre, outputs.dtype))
    saturated = squares > tf.constant((half_range - epsilon) ** 2, outputs.dtype)
    total = tf.cast(tf.size(outputs), tf.float32)
    # A cast and a sum: count_nonzero would add a comparison pass over the batch.
    return tf.reduce_sum(tf.cast(saturated, tf.float32)), total
