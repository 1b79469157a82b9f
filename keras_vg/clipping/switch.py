"""`ClipSwitch`: the whole per-step decision of `AutoClip`, as one pure function of explicit state.

Written in `keras.ops`: the same decision runs in the TensorFlow and the JAX train step.
"""

import collections

import numpy as np
from keras import ops

StepDecision = collections.namedtuple("StepDecision", [
    "clip", "factor", "unitwise", "threshold", "norm_after", "spike", "switched_on", "switched_off", "skipped"])
StepDecision.__doc__ = """What `ClipSwitch` decided about one step.

Attributes:
    clip: Scalar bool tensor: the gradient is to be clipped (for a unit-wise
        policy: the policy is to be asked, in the clipping branch).
    factor: Scalar float32 tensor: what the global-norm rules (guard, policy)
        multiply the gradient by; 1 where they leave it.
    unitwise: Bool: the policy's unit-wise factors (AGC) apply on top of
        `factor` where `clip` is True (the policy's `lazy`).
    threshold: Scalar float32 tensor, finite and positive: the global norm
        above which this step is clipped once clipping is on.
    norm_after: Scalar float32 tensor: the global norm after `factor`.
    spike: Scalar bool tensor: the guard or the trigger saw a spike.
    switched_on: Scalar bool tensor: clipping switched on at this step.
    switched_off: Scalar bool tensor: clipping switched off after this step.
    skipped: Scalar bool tensor: the step's gradient is not finite and is
        not applied.
"""

COUNTERS = {"clipped": 0, "skipped": 0, "skip_run": 0, "last_good": -1}
"""Counts kept with the state (int64): clipped and skipped steps in all, skipped steps in a row, and the
last step whose update was applied (-1: none yet)."""


class ClipSwitch:
    """Decides, each step, whether clipping is on and what it clips to.

    It joins a `SpikeGuard`, an optional trigger and a policy, in optax's
    shape: `init()` returns the state, `update(state, ...)` the decision and
    the next state. `AutoClip` keeps the state in variables and calls
    `update` inside the train step; a test calls it eagerly.

    One step:
    1. A step whose norm is not finite switches clipping on and (with the
       policy's `skip_nonfinite`) is skipped. It leaves every statistic as
       it was, and so does a zero norm, which carries no scale.
    2. The guard judges the norm (`SpikeGuard.check`). The statistics of the
       guard, the trigger and the policy take in the norm clipped at the
       guard's limit: never a non-finite value, never a spike.
    3. A spike of the guard or of the trigger switches clipping on, at that
       very step.
    4. Once on, the step is clipped to the smallest of the guard's limit,
       its SGD cap and the policy's target. With `cooldown=N`, N calm steps
       in a row switch clipping off again.

    Args:
        policy: A `ClipPolicy`: what clips once clipping is on.
        trigger: A `ClipPolicy` whose `exceeded` switches clipping on as
            well as the guard's spikes, or None (the guard's alone).
        guard: A `SpikeGuard`.
        armed: False to clip from the first step (no switching).
        cooldown: Calm steps after which clipping switches off, or None.
    """

    def __init__(self, policy, trigger, guard, armed=True, cooldown=None):
        self.policy, self.trigger, self.guard = policy, trigger, guard
        self.armed, self.cooldown = armed, cooldown

    def init(self):
        """Returns the initial state: a dict from name to a numpy value."""
        state = {"active": np.float32(0.0 if self.armed else 1.0), "calm": np.float32(0.0)}
        state.update({name: np.int64(value) for name, value in COUNTERS.items()})
        for prefix, part in (("guard.", self.guard), ("policy.", self.policy), ("trigger.", self.trigger)):
            if part is not None:
                state.update({prefix + k: v for k, v in part.init().items()})
        return state

    def update(self, state, norm, finite, step, step_size=None, weight_norm=None, grads=None, weights=None):
        """Decides about one step.

        Args:
            state: A dict of tensors, as returned by `init` or `update`.
            norm: The global norm of the (replica-summed, unscaled)
                gradient, a float32 scalar; exact past float32's square
                range (see `AutoClip`).
            finite: Scalar bool tensor: every gradient value is finite.
            step: The step number, an int64 scalar.
            step_size: The learning rate with plain SGD, else None (see
                `SpikeGuard`).
            weight_norm: The global norm of the trainable weights, or None.
            grads: The gradients, for policies that read them.
            weights: Their variables.

        Returns:
            A tuple `(StepDecision, new_state)`.
        """
        def part(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        informative = finite & (norm > 0)
        check = self.guard.check(part("guard."), norm, step_size, weight_norm)
        # What every statistic takes in: clipped at the guard's limit, and a harmless 1 where the
        # step says nothing (its new statistics are discarded below).
        seen = ops.where(informative, ops.minimum(norm, check.limit), 1.0)
        statistics = {"guard." + k: v for k, v in self.guard.update(part("guard."), seen).items()}
        spike = check.spike
        if self.trigger is not None:
            triggered, trigger_state = self.trigger.update(part("trigger."), seen, grads, weights)
            statistics.update({"trigger." + k: v for k, v in trigger_state.items()})
            spike |= triggered.exceeded
        decided = None
        if not self.policy.lazy:
            decided, policy_state = self.policy.update(part("policy."), seen, grads, weights)
            statistics.update({"policy." + k: v for k, v in policy_state.items()})
        spike &= informative

        was_active = state["active"] > 0
        active = was_active | spike | ~finite if self.armed else ops.convert_to_tensor(True)
        limit = ops.minimum(check.limit, ops.where(active, check.cap, np.inf))
        if decided is None:
            target, threshold = limit, limit
        else:
            target = ops.minimum(ops.where(decided.exceeded, decided.norm_after, seen), limit)
            threshold = ops.minimum(limit, ops.where(ops.isnan(decided.threshold), np.inf, decided.threshold))
        applies = active & finite
        norm_after = ops.where(applies, ops.minimum(target, norm), norm)
        clip = applies & ((norm_after < norm) | self.policy.lazy)
        factor = ops.where(applies & (norm_after < norm), norm_after / ops.where(norm > 0, norm, 1.0), 1.0)

        calm = ops.where(applies & ~spike, state["calm"] + 1.0, 0.0)
        switch_off = active & (calm >= self.cooldown) if self.cooldown is not None else ops.convert_to_tensor(False)
        skipped = ~finite & self.policy.skip_nonfinite
        new_state = {name: ops.where(informative, value, state[name]) for name, value in statistics.items()}
        new_state.update(self._count(state, step, clip & (not self.policy.lazy), skipped))
        new_state["active"] = ops.cast(active & ~switch_off, "float32")
        new_state["calm"] = ops.where(switch_off, 0.0, calm)
        decision = StepDecision(
            clip=clip, factor=factor, unitwise=self.policy.lazy, threshold=threshold, norm_after=norm_after,
            spike=spike, switched_on=active & ~was_active, switched_off=switch_off, skipped=skipped)
        return decision, new_state

    @staticmethod
    def _count(state, step, clipped, skipped):
        # The counters' own integer type: int64 on TensorFlow, int32 on JAX unless it runs in 64 bits.
        integer = state["clipped"].dtype
        return {
            "clipped": state["clipped"] + ops.cast(clipped, integer),
            "skipped": state["skipped"] + ops.cast(skipped, integer),
            "skip_run": ops.where(skipped, state["skip_run"] + 1, ops.zeros((), integer)),
            "last_good": ops.where(skipped, state["last_good"], ops.cast(step, integer)),
        }

    @staticmethod
    def count_clipped(state, new_state, clipped):
        """`new_state` with this step's clip counted as `clipped` (for a unit-wise policy, known after clipping)."""
        return dict(new_state, clipped=state["clipped"] + ops.cast(clipped, state["clipped"].dtype))
