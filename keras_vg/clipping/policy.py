"""The shape every clipping policy has: explicit state, and pure functions of it.

A policy is a small object in the style of optax's gradient transformations.
`init()` returns its state as a dict of numpy values; `update(state, norm, ...)`
returns a `Decision` for this step and the next state; `clip(decision, grads)`
returns the clipped gradients. Nothing in a policy is a variable: `AutoClip`
keeps the state in variables and calls `update` inside the compiled train
step, and a test calls it eagerly on a sequence of norms. Policies are written
in `keras.ops`, so that one decision serves Keras's TensorFlow and JAX
backends alike.
"""

import collections

import numpy as np
from keras import ops

MAX_NORM = 1e18
"""The largest global norm any statistic takes in, and the largest threshold.

A norm above it is an overflow (a spike, whatever came before). Its square,
1e36, leaves float32 (up to 3.4e38) room for the sums and moving averages of
squares the policies keep, so no statistic turns infinite on the way.
"""

Decision = collections.namedtuple("Decision", ["exceeded", "threshold", "norm_after", "factor"])
Decision.__doc__ = """What a policy decided about one step.

Attributes:
    exceeded: Scalar bool tensor: the gradient is beyond the policy's limit,
        and is clipped when clipping is on.
    threshold: Scalar float32 tensor: the global norm above which the step is
        clipped; NaN where the policy has none (warm-up, unit-wise AGC).
    norm_after: Scalar float32 tensor: the global norm the gradient has once
        clipped (its own norm where not `exceeded`).
    factor: What `clip` multiplies the gradients by: a scalar tensor, or one
        broadcastable tensor (or None, untouched) per gradient.
"""


class ClipPolicy:
    """Base class of the clipping policies.

    Subclasses implement `init` and `update`, and `clip` where the default
    (one factor for every gradient) does not fit. `AutoClip` gives `update`
    only norms that are finite, positive and at most the spike guard's limit
    (see `SpikeGuard`), so that no statistic ever takes in a non-finite or a
    spike value: on a step whose norm is not finite or is zero, the old state
    is kept; a spike reaches the policy clipped to the guard's limit. Each
    policy's docstring says what it does before its statistics are warm.

    Args:
        skip_nonfinite: When True, a step whose gradient holds NaN or inf
            changes neither the weights nor the optimizer's slots (see
            `AutoClip`). Defaults to `True`.
    """

    lazy = False
    """True for a stateless policy whose decision `AutoClip` may leave uncomputed while armed."""

    def __init__(self, skip_nonfinite=True):
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"`skip_nonfinite` must be a bool. Received: skip_nonfinite={skip_nonfinite!r}")
        self.skip_nonfinite = skip_nonfinite

    def init(self):
        """Returns the initial state: a dict from name to a float32 numpy array."""
        return {}

    def update(self, state, norm, grads=None, weights=None):
        """Decides about one step.

        Args:
            state: A dict of tensors, as returned by `init` or `update`.
            norm: The global L2 norm of the (replica-summed, unscaled)
                gradient, a finite float32 scalar.
            grads: The gradients, for unit-wise policies.
            weights: The variables they belong to, for unit-wise policies.

        Returns:
            A tuple `(decision, new_state)`.
        """
        raise NotImplementedError

    def clip(self, decision, grads):
        """Returns `grads` clipped as `decision` says (None entries stay None)."""
        return scale_gradients(grads, decision.factor)

    def bind(self, model):
        """Learns what the policy needs of a model (AGC: which layer is the output). Defaults to nothing."""
        del model

    def get_config(self):
        return {"skip_nonfinite": self.skip_nonfinite}

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


def scale_gradients(grads, factor):
    """Multiplies each gradient by its factor: one scalar for all, or one per gradient (None: unchanged)."""
    factors = factor if isinstance(factor, (list, tuple)) else [factor] * len(grads)
    return [_scale(g, f) for g, f in zip(grads, factors)]


def _scale(grad, factor):
    if grad is None or factor is None:
        return grad
    if is_sparse(grad):
        from keras_vg.clipping._tf import tf

        return tf.IndexedSlices(grad.values * ops.cast(factor, grad.values.dtype), grad.indices, grad.dense_shape)
    return grad * ops.cast(factor, grad.dtype)


def is_sparse(grad):
    """Whether `grad` is a TensorFlow `IndexedSlices` (an Embedding's gradient there): only its values count."""
    return hasattr(grad, "indices") and hasattr(grad, "dense_shape") and hasattr(grad, "values")


def weights_norm(values):
    """The global L2 norm of some weights (or any tensors), in float32.

    Args:
        values: A non-empty list of tensors (or variables) of any float dtype.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> float(weights_norm([np.array([3.0]), np.array([4.0])]))
    5.0
    """
    return ops.sqrt(sum(ops.sum(ops.square(ops.cast(v, "float32"))) for v in values))


def norm_decision(norm, threshold, target):
    """The decision of a policy that clips the global norm down to `target` above `threshold`.

    Args:
        norm: The global norm, a float32 scalar.
        threshold: Clip where `norm > threshold` (never where it is NaN).
        target: The norm a clipped gradient gets.

    Returns:
        A `Decision` with one scalar factor.
    """
    exceeded = norm > threshold
    safe_norm = ops.where(norm > 0, norm, 1.0)
    return Decision(
        exceeded=exceeded,
        threshold=threshold,
        norm_after=ops.where(exceeded, target, norm),
        factor=ops.where(exceeded, target / safe_norm, 1.0),
    )


def ring_init(capacity):
    """The state of a ring buffer of the last `capacity` norms: `norms`, `size` (valid entries), `position`."""
    return {
        "norms": np.zeros([capacity], np.float32),
        "size": np.float32(0.0),  # valid entries, at most `capacity`
        "position": np.float32(0.0),  # next slot to write
    }


def ring_append(state, value):
    """The ring buffer's state with `value` written over its oldest entry."""
    capacity = state["norms"].shape[0]
    slots = ops.arange(capacity, dtype="float32")
    return {
        "norms": ops.where(ops.equal(slots, state["position"]), value, state["norms"]),
        "size": ops.minimum(state["size"] + 1.0, float(capacity)),
        "position": ops.mod(state["position"] + 1.0, float(capacity)),
    }


def ring_percentile(state, p):
    """`np.percentile(norms, p)` (linear method) over the ring buffer's valid entries; NaN while it is empty."""
    values, size = state["norms"], state["size"]
    valid = ops.arange(values.shape[0], dtype="float32") < size
    ordered = ops.sort(ops.where(valid, values, np.inf))
    rank = (p / 100.0) * ops.maximum(size - 1.0, 0.0)
    below = ops.floor(rank)
    lower = ops.take(ordered, ops.cast(below, "int32"))
    upper = ops.take(ordered, ops.cast(ops.minimum(below + 1.0, ops.maximum(size - 1.0, 0.0)), "int32"))
    return ops.where(size > 0, lower + (upper - lower) * (rank - below), np.nan)


def check_positive(name, value, integer=False, allow_zero=False):
    """Raises in Keras style unless `value` is a (strictly) positive number."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {what} {bound}. Received: {name}={value!r}")
