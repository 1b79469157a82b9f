"""`AGC`: adaptive gradient clipping, unit-wise against the weights' norms."""

import numpy as np
from keras import ops

from keras_vg.clipping.policy import ClipPolicy, Decision, check_positive, is_sparse

DIVISION_EPSILON = 1e-6
"""optax's guard against dividing by a zero gradient norm (it cannot engage)."""


def unit_axes(shape):
    """The axes a unit's norm runs over, by the variable's rank, as optax's `unitwise_norm`.

    Keras kernels keep the output units last, like JAX's: a Dense kernel
    `(in, out)` has one unit per output, a Conv2D kernel `(h, w, in, out)` one
    per filter. Scalars and vectors (biases) are one unit. Rank-3 kernels
    (multi-head attention's `(in, heads, dim)`, but also Conv1D's
    `(w, in, out)`) reduce over axis 0 only, as optax does.

    Args:
        shape: The variable's shape, a tuple or list (or `tf.TensorShape`).

    Returns:
        A tuple of axes, or None for the whole tensor.
    """
    dims = list(shape)
    if sum(1 for d in dims if d != 1) <= 1:
        return None
    if len(dims) in (2, 3):
        return (0,)
    if len(dims) == 4:
        return (0, 1, 2)
    if len(dims) == 5:
        return (0, 1, 2, 3)
    raise ValueError(f"AGC supports variables of rank 1 to 5. Received: shape={dims}")


def unitwise_norm(x, axes):
    """L2 norms of `x` over `axes`, kept broadcastable to `x` (None: the whole tensor)."""
    # Not tf.math.reduce_euclidean_norm: XLA has no kernel for it, and outside XLA it was
    # no faster in a training step (docs/PERFORMANCE.md).
    x = ops.cast(x, "float32")
    if axes is None:
        return ops.reshape(ops.sqrt(ops.sum(ops.square(x))), [1] * max(len(x.shape), 1))
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


class AGC(ClipPolicy):
    """Adaptive gradient clipping: each unit's gradient is kept below a fraction of its weights.

    For every unit i (an output unit of a Dense kernel, a filter of a Conv
    kernel, a whole bias), where `‖G_i‖ > clip_factor · max(‖W_i‖, eps)` the
    unit's gradient is rescaled to that bound. The variables of the model's
    output layer are left alone (the paper's advice). Which axes make a unit
    follows optax's `adaptive_grad_clip` (see `unit_axes`). Sparse gradients
    (Embedding) are measured by their values.

    AGC has no global threshold: `AutoClip` records `clip_threshold` as NaN.

    Args:
        clip_factor: λ, the largest ratio of a unit's gradient norm to its
            weight norm. Defaults to `0.01`.
        eps: Floor of the weight norm, so that zero-initialised units can
            move. Defaults to `1e-3`.
        exclude_output: Leave the output layer's variables unclipped.
            Defaults to `True`.
        skip_nonfinite: Skip steps whose gradient is not finite. Defaults to
            `True`.

    Example:

    >>> import tensorflow as tf
    >>> policy = AGC(clip_factor=0.01)
    >>> w = tf.Variable([[1.0], [0.0]])          # one unit, ‖W‖ = 1
    >>> decision, _ = policy.update({}, tf.constant(1.0), [tf.constant([[0.6], [0.8]])], [w])
    >>> [round(float(v), 4) for v in policy.clip(decision, [tf.constant([[0.6], [0.8]])])[0].numpy().ravel()]
    [0.006, 0.008]

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021 (arXiv:2102.06171).
    """

    lazy = True  # stateless, and it reads every weight: nothing to compute while clipping is armed

    def __init__(self, clip_factor=0.01, eps=1e-3, exclude_output=True, skip_nonfinite=True):
        super().__init__(skip_nonfinite)
        check_positive("clip_factor", clip_factor)
        check_positive("eps", eps)
        if not isinstance(exclude_output, bool):
            raise ValueError(f"`exclude_output` must be a bool. Received: exclude_output={exclude_output!r}")
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.exclude_output = exclude_output
        self._excluded = set()

    def bind(self, model):
        """Finds the output layer's variables, to leave them unclipped."""
        self._excluded = set()
        if not self.exclude_output:
            return
        for variable in output_layer_variables(model):
            self._excluded.add(id(variable))
            self._excluded.add(id(getattr(variable, "value", variable)))

    def update(self, state, norm, grads=None, weights=None):
        if grads is None or weights is None:
            raise ValueError("AGC needs the gradients and the weights. Received: grads=None or weights=None")
        units, squares = [], []  # units: (position, gradient's unit norms, weights' unit norms)
        for position, (grad, weight) in enumerate(zip(grads, weights)):
            if grad is None:
                continue
            values = ops.cast(grad.values if is_sparse(grad) else grad, "float32")
            if id(weight) in self._excluded:
                squares.append(ops.sum(ops.square(values)))
                continue
            axes = unit_axes(weight.shape)
            units.append((position, unitwise_norm(values, axes), unitwise_norm(weight, axes)))
        factors = [None] * len(grads)
        exceeded = ops.convert_to_tensor(False)
        if units:
            # Every unit of every variable in one vector: a handful of ops in all rather than a
            # handful per variable (each op is scheduled, or on a GPU launched, whatever its size).
            grad_norms = ops.concatenate([ops.reshape(g, [-1]) for _, g, _ in units], 0)
            weight_norms = ops.concatenate([ops.reshape(w, [-1]) for _, _, w in units], 0)
            limit = self.clip_factor * ops.maximum(weight_norms, self.eps)
            clipped = grad_norms >= limit  # optax keeps a unit only where g_norm < max_norm
            factor = ops.where(clipped, limit / ops.maximum(grad_norms, DIVISION_EPSILON), 1.0)
            exceeded = ops.any(clipped)
            squares.append(ops.sum(ops.square(grad_norms * factor)))
            ends = np.cumsum([int(np.prod(g.shape)) for _, g, _ in units])[:-1].tolist()
            pieces = ops.split(factor, ends) if ends else [factor]
            for (position, g, _), piece in zip(units, pieces):
                factors[position] = ops.reshape(piece, g.shape)
        norm_after = ops.sqrt(sum(squares[1:], squares[0])) if squares else ops.zeros([])
        decision = Decision(exceeded=exceeded, threshold=ops.convert_to_tensor(np.nan, "float32"),
                            norm_after=ops.where(exceeded, norm_after, norm), factor=factors)
        return decision, dict(state)

    def get_config(self):
        return {"clip_factor": self.clip_factor, "eps": self.eps, "exclude_output": self.exclude_output,
                **super().get_config()}


def output_layer_variables(model):
    """The trainable variables of a model's output layer(s).

    Functional models name their output layers; otherwise the output layer
    is the last layer, in model order, that has trainable variables.
    """
    layers = []
    for name in getattr(model, "output_names", None) or []:
        try:
            layer = model.get_layer(name)
        except ValueError:
            continue
        if layer.trainable_variables:
            layers.append(layer)
    if not layers:
        from keras_vg.layers import walk_layers

        with_weights = [layer for layer in walk_layers(model) if layer.trainable_variables]
        layers = with_weights[-1:]
    return [v for layer in layers for v in layer.trainable_variables]
