"""`SpikeGuard`: protection from the first step, before any policy's statistics are warm."""

import collections

import numpy as np
from keras import ops

from keras_vg.clipping.policy import MAX_NORM, check_positive, ring_append, ring_init, ring_percentile

GuardCheck = collections.namedtuple("GuardCheck", ["spike", "limit", "cap"])
GuardCheck.__doc__ = """What the guard says about one step's global norm.

Attributes:
    spike: Scalar bool tensor: the norm is a spike (far above the recent
        norms, past `MAX_NORM`, or, with SGD, a step that would move the
        weights too far). A spike switches clipping on.
    limit: Scalar float32 tensor, finite and positive: `factor` times the
        median of the recent norms (at most `MAX_NORM`; `MAX_NORM` before
        any norm was seen). No norm above it reaches a statistic, and once
        clipping is on no gradient above it is applied.
    cap: Scalar float32 tensor: with SGD, the norm at which one step moves
        the weights by `clip_update_ratio` of their norm; infinite where that
        rule does not apply. Once clipping is on, it bounds every step.
"""


class SpikeGuard:
    """Recognises spikes from the first step on, and bounds what the statistics see.

    A policy's own statistics need steps to warm up (`ZScore`: 25 steps), and
    a run can be ruined before that. The guard needs no warm-up:

    - **A norm far above the recent ones.** The guard keeps the last `window`
      norms it let through. A norm above `factor` times their median is a
      spike from the second step on. The median, not the mean: one spike
      among them does not move it.
    - **An overflowing norm**, above `MAX_NORM` (1e18), is a spike from the
      first step on. Non-finite norms are `AutoClip`'s to handle (they are
      skipped), and never reach the guard.
    - **With SGD, a step that would move the weights too far:** where
      `learning_rate · ‖g‖ ≥ spike_update_ratio · ‖W‖` (‖W‖ the global norm
      of the trainable weights), the update would change the weights by that
      fraction of their norm in one step. Healthy SGD training moves them by
      at most a few percent per step (6% was the largest seen on the rescue
      benchmark's healthy models); a model whose learning rate is too large
      for its initialisation does so at its very first step, before any norm
      could serve as a reference.

    Once clipping is on, the guard also bounds every step with SGD: no update
    moves the weights by more than `clip_update_ratio` of their norm (the
    `cap`). This is the clipping that rescued, on the benchmark, models whose
    first updates ruin them; a threshold learnt from norms seen so far comes
    too late for them (docs/CLIPPING.md).

    The window takes each norm clipped at the guard's `limit`: a spike enters
    as the limit, never as itself, and nothing non-finite enters at all. A
    lasting change of scale still gets in, by at most `factor` per half
    window.

    Args:
        factor: A norm above `factor` times the median of the recent norms
            is a spike. Defaults to `10.0`.
        window: How many recent norms the median is taken over. Defaults to
            `32`.
        spike_update_ratio: With SGD, the update ratio `lr·‖g‖/‖W‖` at or
            above which a step is a spike; None to leave it out. Defaults to
            `0.2`.
        clip_update_ratio: With SGD, the largest update ratio once clipping
            is on; None for no such bound. Defaults to `0.01`.

    Example:

    >>> guard = SpikeGuard(factor=10.0)
    >>> state = {k: ops.convert_to_tensor(v) for k, v in guard.init().items()}
    >>> for norm in [2.0, 3.0, 4.0]:
    ...     check = guard.check(state, ops.convert_to_tensor(norm))
    ...     state = guard.update(state, ops.minimum(norm, check.limit))
    >>> check = guard.check(state, ops.convert_to_tensor(500.0))
    >>> bool(check.spike), float(check.limit)
    (True, 30.0)

    References:
        The update-ratio bound is in the spirit of Clippy (Tang et al.,
        "Improving Training Stability for Multitask Ranking Models in
        Recommender Systems", KDD 2023, arXiv:2302.09178), which clips each
        update relative to its weights.
    """

    def __init__(self, factor=10.0, window=32, spike_update_ratio=0.2, clip_update_ratio=0.01):
        check_positive("factor", factor)
        if factor <= 1:
            raise ValueError(f"`factor` must be > 1. Received: factor={factor!r}")
        check_positive("window", window, integer=True)
        for name, value in (("spike_update_ratio", spike_update_ratio), ("clip_update_ratio", clip_update_ratio)):
            if value is not None:
                check_positive(name, value)
        self.factor = float(factor)
        self.window = int(window)
        self.spike_update_ratio = None if spike_update_ratio is None else float(spike_update_ratio)
        self.clip_update_ratio = None if clip_update_ratio is None else float(clip_update_ratio)

    def init(self):
        """Returns the initial state: a dict from name to a float32 numpy array."""
        return ring_init(self.window)

    def check(self, state, norm, step_size=None, weight_norm=None):
        """Judges one step's global norm against the state (which it does not change).

        Args:
            state: A dict of tensors, as returned by `init` or `update`.
            norm: The global norm, a float32 scalar (finite, or it is only
                checked for overflow).
            step_size: The learning rate where one step moves the weights by
                `step_size · g` (plain SGD), else None.
            weight_norm: The global norm of the trainable weights, or None.

        Returns:
            A `GuardCheck`.
        """
        median = ring_percentile(state, 50.0)  # NaN before any norm
        known = median > 0  # NaN (nothing seen yet) and zero are no scale to compare with
        limit = ops.minimum(ops.where(known, self.factor * median, MAX_NORM), MAX_NORM)
        spike = (known & (norm > limit)) | (norm > MAX_NORM)
        cap = ops.convert_to_tensor(np.inf, "float32")
        if step_size is not None and weight_norm is not None:
            step_size = ops.cast(step_size, "float32")
            # A weight norm not yet measured, or zero, gives no scale: the rule waits for one.
            usable = (weight_norm > 0) & ops.isfinite(weight_norm) & (step_size > 0)
            safe_step = ops.where(usable, step_size, 1.0)
            if self.spike_update_ratio is not None:
                spike |= usable & (step_size * norm >= self.spike_update_ratio * weight_norm)
            if self.clip_update_ratio is not None:
                cap = ops.where(usable, self.clip_update_ratio * weight_norm / safe_step, np.inf)
        return GuardCheck(spike=spike, limit=limit, cap=cap)

    def update(self, state, seen):
        """Returns the state with `seen` (a finite norm at most the step's `limit`) in the window."""
        return ring_append(state, seen)

    def get_config(self):
        return {"factor": self.factor, "window": self.window, "spike_update_ratio": self.spike_update_ratio,
                "clip_update_ratio": self.clip_update_ratio}

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"
