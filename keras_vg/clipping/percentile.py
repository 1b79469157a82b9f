"""`Percentile`: AutoClip's rule, clip at a percentile of the norms seen so far."""

from keras_vg.clipping.policy import ClipPolicy, check_positive, norm_decision, ring_append, ring_init, ring_percentile


class Percentile(ClipPolicy):
    """Clips the global norm at the `p`-th percentile of the recent global norms.

    Each step appends its global norm to a ring buffer of the last
    `history` norms, then clips at `np.percentile(buffer, p)` (linear
    interpolation), the current norm included, as in the paper's code. The
    paper keeps every norm; the bounded buffer keeps memory and time per step
    constant. Before the buffer is full, the percentile is taken over the
    norms it has: over one norm, the norm itself (no clip).

    The norm appended is the pre-clip one, as in the paper (under `AutoClip`,
    as bounded by the spike guard): a history of the percentile's own
    clipped norms could only ratchet down.

    Args:
        p: The percentile, in (0, 100]. Defaults to `10` (the paper's).
        history: How many recent norms the percentile is taken over.
            Defaults to `1000`.
        skip_nonfinite: Skip steps whose gradient is not finite. Defaults to
            `True`.

    Example:

    >>> from keras import ops
    >>> policy = Percentile(p=50, history=4)
    >>> state = {k: ops.convert_to_tensor(v) for k, v in policy.init().items()}
    >>> for norm in [1.0, 2.0, 3.0]:
    ...     decision, state = policy.update(state, ops.convert_to_tensor(norm))
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
        return ring_init(self.history)

    def update(self, state, norm, grads=None, weights=None):
        del grads, weights
        new_state = ring_append(state, norm)
        threshold = ring_percentile(new_state, self.p)
        return norm_decision(norm, threshold, threshold), new_state

    def get_config(self):
        return {"p": self.p, "history": self.history, **super().get_config()}
