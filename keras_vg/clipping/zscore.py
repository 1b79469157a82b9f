"""`ZScore`: ZClip's rule, clip spikes against running statistics of the norm."""

import numpy as np
from keras import ops

from keras_vg.clipping.policy import ClipPolicy, Decision, check_positive


class ZScore(ClipPolicy):
    """Clips the global norm where it spikes against its running mean and deviation.

    For the first `warmup` steps the global norms are collected; their mean
    μ and (population) variance σ² start two exponential moving averages.
    Before that, `ZScore` decides nothing (no threshold): under `AutoClip`,
    the spike guard's bounds are all there is in those steps.
    After that, a step whose z-score `z = (‖g‖ − μ) / (σ + 1e-6)` exceeds `z`
    is clipped to `μ + z² σ / z_t` (ZClip's "adaptive scaling": the larger the
    spike, the harder the clip), and the averages are updated with the
    clipped norm:

        μ ← α μ + (1 − α) x,    σ² ← α σ² + (1 − α) (x − μ)²

    `ZScore` is also the default *trigger* of `AutoClip`: the rule that
    decides when clipping switches on.

    Args:
        alpha: Smoothing factor of the moving averages, in (0, 1). Defaults
            to `0.97`.
        z: The z-score above which a norm is a spike. Defaults to `2.5`.
        warmup: Steps collected before the first decision. Defaults to `25`.
        skip_nonfinite: Skip steps whose gradient is not finite. Defaults to
            `True`.

    Example:

    >>> policy = ZScore(warmup=3)
    >>> state = {k: ops.convert_to_tensor(v) for k, v in policy.init().items()}
    >>> for norm in [1.0, 1.1, 0.9, 50.0]:
    ...     decision, state = policy.update(state, ops.convert_to_tensor(norm))
    >>> bool(decision.exceeded), round(float(decision.norm_after), 3)
    (True, 1.001)

    References:
        Kumar, Owen, Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training", 2025 (arXiv:2504.02507).
    """

    EPSILON = 1e-6  # ZClip's, added to σ in the z-score

    def __init__(self, alpha=0.97, z=2.5, warmup=25, skip_nonfinite=True):
        super().__init__(skip_nonfinite)
        check_positive("alpha", alpha)
        if alpha >= 1:
            raise ValueError(f"`alpha` must be in (0, 1). Received: alpha={alpha!r}")
        check_positive("z", z)
        check_positive("warmup", warmup, integer=True)
        self.alpha = float(alpha)
        self.z = float(z)
        self.warmup = int(warmup)

    def init(self):
        return {
            "count": np.float32(0.0),  # norms seen, counted up to `warmup`
            "mean": np.float32(0.0),
            # During the warm-up, the sum of squared deviations from the mean (Welford's M2);
            # from the step that ends it on, the variance.
            "var": np.float32(0.0),
        }

    def update(self, state, norm, grads=None, weights=None):
        del grads, weights
        count, mean, var = state["count"], state["mean"], state["var"]
        ready = count >= self.warmup  # the moving averages exist

        std = ops.sqrt(var)
        z_t = (norm - mean) / (std + self.EPSILON)
        exceeded = ready & (z_t > self.z)
        target = mean + self.z * self.z * std / ops.where(exceeded, z_t, 1.0)
        threshold = ops.where(ready, mean + self.z * (std + self.EPSILON), np.nan)
        norm_after = ops.where(exceeded, target, norm)

        # Warm-up: the mean and variance of the first `warmup` norms, kept as they come (Welford), so
        # that no buffer of them is needed; after it, ZClip's moving averages of the clipped norm.
        seen = count + 1.0
        warm_mean = mean + (norm - mean) / seen
        warm_m2 = var + (norm - mean) * (norm - warm_mean)
        warm_var = ops.where(ops.equal(seen, self.warmup), warm_m2 / seen, warm_m2)
        new_mean = self.alpha * mean + (1.0 - self.alpha) * norm_after
        new_var = self.alpha * var + (1.0 - self.alpha) * ops.square(norm_after - new_mean)
        new_state = {
            "count": ops.minimum(seen, float(self.warmup)),
            "mean": ops.where(ready, new_mean, warm_mean),
            "var": ops.where(ready, new_var, warm_var),
        }
        decision = Decision(
            exceeded=exceeded,
            threshold=threshold,
            norm_after=norm_after,
            factor=ops.where(exceeded, target / ops.where(norm > 0, norm, 1.0), 1.0),
        )
        return decision, new_state

    def get_config(self):
        return {"alpha": self.alpha, "z": self.z, "warmup": self.warmup, **super().get_config()}
