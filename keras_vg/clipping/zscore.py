"""`ZScore`: ZClip's rule, clip spikes against running statistics of the norm."""

import numpy as np
import tensorflow as tf

from keras_vg.clipping.policy import ClipPolicy, Decision, check_positive


class ZScore(ClipPolicy):
    """Clips the global norm where it spikes against its running mean and deviation.

    For the first `warmup` steps the global norms are collected; their mean
    μ and (population) variance σ² start two exponential moving averages.
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
    >>> state = {k: tf.constant(v) for k, v in policy.init().items()}
    >>> for norm in [1.0, 1.1, 0.9, 50.0]:
    ...     decision, state = policy.update(state, tf.constant(norm))
    >>> bool(decision.exceeded), round(float(decision.norm_after), 3)
    (True, 1.007)

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
            "warmup_norms": np.zeros([self.warmup], np.float32),
            "count": np.float32(0.0),  # norms seen, counted up to `warmup`
            "mean": np.float32(0.0),
            "var": np.float32(0.0),
        }

    def update(self, state, norm, grads=None, weights=None):
        del grads, weights
        count, mean, var = state["count"], state["mean"], state["var"]
        ready = count >= self.warmup  # the moving averages exist

        # Warm-up: collect the norm; the step that fills the buffer starts the averages.
        slots = tf.range(self.warmup, dtype=tf.float32)
        warmup_norms = tf.where(ready | tf.not_equal(slots, count), state["warmup_norms"], norm)
        first_mean = tf.reduce_mean(warmup_norms)
        first_var = tf.reduce_mean(tf.square(warmup_norms - first_mean))

        std = tf.sqrt(var)
        z_t = (norm - mean) / (std + self.EPSILON)
        exceeded = ready & (z_t > self.z)
        safe_z = tf.where(exceeded, z_t, 1.0)
        target = mean + self.z * self.z * std / safe_z
        threshold = tf.where(ready, mean + self.z * (std + self.EPSILON), np.nan)
        norm_after = tf.where(exceeded, target, norm)
        safe_norm = tf.where(norm > 0, norm, 1.0)

        new_mean = self.alpha * mean + (1.0 - self.alpha) * norm_after
        new_var = self.alpha * var + (1.0 - self.alpha) * tf.square(norm_after - new_mean)
        starts = tf.logical_not(ready) & tf.equal(count + 1.0, self.warmup)
        new_state = {
            "warmup_norms": warmup_norms,
            "count": tf.minimum(count + 1.0, float(self.warmup)),
            "mean": tf.where(ready, new_mean, tf.where(starts, first_mean, mean)),
            "var": tf.where(ready, new_var, tf.where(starts, first_var, var)),
        }
        decision = Decision(
            exceeded=exceeded,
            threshold=threshold,
            norm_after=norm_after,
            factor=tf.where(exceeded, target / safe_norm, 1.0),
        )
        return decision, new_state

    def get_config(self):
        return {"alpha": self.alpha, "z": self.z, "warmup": self.warmup, **super().get_config()}
