"""`Percentile`: AutoClip's rule, clip at a percentile of the norms seen so far."""

import numpy as np
import tensorflow as tf

from keras_vg.clipping.policy import ClipPolicy, check_positive, norm_decision


class Percentile(ClipPolicy):
    """Clips the global norm at the `p`-th percentile of the recent global norms.

    Each step appends its (finite, pre-clip) global norm to a ring buffer of
    the last `history` norms, then clips at `np.percentile(buffer, p)` (linear
    interpolation), the current norm included, as in the paper's code. The
    paper keeps every norm; the bounded buffer keeps memory and time per step
    constant.

    Args:
        p: The percentile, in (0, 100]. Defaults to `10` (the paper's).
        history: How many recent norms the percentile is taken over.
            Defaults to `1000`.
        skip_nonfinite: Skip steps whose gradient is not finite. Defaults to
            `True`.

    Example:

    >>> policy = Percentile(p=50, history=4)
    >>> state = {k: tf.constant(v) for k, v in policy.init().items()}
    >>> for norm in [1.0, 2.0, 3.0]:
    ...     decision, state = policy.update(state, tf.constant(norm))
    >>> float(decision.threshold)
    2.0

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks", MLSP 2020
        (arXiv:2007.14469).
    """

    def __init__(self, p=10, history=1000, skip_nonfinite=True):
        super().__init__(skip_nonfinite)
        check_positive("p", p)
        if p > 100:
            raise ValueError(f"`p` must be in (0, 100]. Received: p={p!r}")
        check_positive("history", history, integer=True)
        self.p = float(p)
        self.history = int(history)

    def init(self):
        return {
            "norms": np.zeros([self.history], np.float32),
            "size": np.float32(0.0),  # valid entries, at most `history`
            "position": np.float32(0.0),  # next slot to write
        }

    def update(self, state, norm, grads=None, weights=None):
        del grads, weights
        slots = tf.range(self.history, dtype=tf.float32)
        norms = tf.where(tf.equal(slots, state["position"]), norm, state["norms"])
        size = tf.minimum(state["size"] + 1.0, float(self.history))
        position = tf.math.floormod(state["position"] + 1.0, float(self.history))
        threshold = _percentile(norms, size, self.p)
        new_state = {"norms": norms, "size": size, "position": position}
        return norm_decision(norm, threshold, threshold), new_state

    def get_config(self):
        return {"p": self.p, "history": self.history, **super().get_config()}


def _percentile(values, size, p):
    """`np.percentile(values[:size], p)` (linear method) for a buffer filled from its start."""
    valid = tf.range(tf.shape(values)[0], dtype=tf.float32) < size
    ordered = tf.sort(tf.where(valid, values, np.inf))
    rank = (p / 100.0) * (size - 1.0)
    below = tf.floor(rank)
    lower = tf.gather(ordered, tf.cast(below, tf.int32))
    upper = tf.gather(ordered, tf.cast(tf.minimum(below + 1.0, size - 1.0), tf.int32))
    return lower + (upper - lower) * (rank - below)
