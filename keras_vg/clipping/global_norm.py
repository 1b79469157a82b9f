"""`GlobalNorm`: clip the global gradient norm at a fixed threshold."""

from keras import ops

from keras_vg.clipping.policy import ClipPolicy, check_positive, norm_decision


class GlobalNorm(ClipPolicy):
    """Clips the global L2 norm of the gradient at a fixed `threshold`.

    Where ‖g‖ > `threshold`, every gradient is multiplied by
    `threshold / ‖g‖`; the norm is that of the replica-summed gradient, unlike
    Keras's `global_clipnorm` under a `tf.distribute` strategy.

    Args:
        threshold: The largest global norm let through. Defaults to `1.0`.
        skip_nonfinite: Skip steps whose gradient is not finite. Defaults to
            `True`.

    Example:

    >>> policy = GlobalNorm(threshold=1.0)
    >>> decision, _ = policy.update({}, ops.convert_to_tensor(4.0))
    >>> float(decision.factor)
    0.25

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013 (arXiv:1211.5063).
    """

    def __init__(self, threshold=1.0, skip_nonfinite=True):
        super().__init__(skip_nonfinite)
        check_positive("threshold", threshold)
        self.threshold = float(threshold)

    def update(self, state, norm, grads=None, weights=None):
        del grads, weights
        threshold = ops.convert_to_tensor(self.threshold, "float32")
        return norm_decision(norm, threshold, threshold), dict(state)

    def get_config(self):
        return {"threshold": self.threshold, **super().get_config()}
