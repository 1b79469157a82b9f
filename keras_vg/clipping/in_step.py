"""AutoClip's part inside the train step: its hooks on the optimizer and the step they run.

Two hooks, both through `keras_vg._keras_compat` (the only module that knows
Keras's private optimizer code): the `CLIP` stage, which decides on the
replica-summed, unscaled gradient before the update, and the update guard,
which skips the update of a non-finite step. The decision itself is
`ClipSwitch.update`, a pure function; this module reads and writes the state
and the record buffers around it.
"""

import threading
import warnings

import keras

from keras_vg import _keras_compat
from keras_vg.clipping._tf import tf
from keras_vg.clipping.policy import scale_gradients, weights_norm
from keras_vg.patches import Patches


def global_norm(tensors):
    """The global L2 norm and whether it is finite (`stats.global_norm_of`: one read of the gradient).

    Finite values whose squares overflow float32 (a norm past 1.8e19) make it
    inf: such a gradient counts as non-finite and is skipped like one.
    Telling the two apart would take a second look at the gradient, behind a
    conditional that costs a few percent of every step
    (docs/PERFORMANCE.md); a norm that large is past the guard's ceiling
    (`MAX_NORM`) anyway.

    Args:
        tensors: Gradients (dense tensors or `IndexedSlices`).

    Returns:
        `(norm, finite)`: the float32 norm, and a bool tensor.

    Example:

    >>> from keras_vg.clipping._tf import tf
    >>> norm, finite = global_norm([tf.constant([3.0]), tf.constant([4.0])])
    >>> float(norm), bool(finite)
    (5.0, True)
    """
    from keras_vg import stats

    norm = stats.global_norm_of([stats.dense_values(t) for t in tensors])
    return norm, tf.math.is_finite(norm)


def sgd_step_size(optimizer):
    """The learning rate where one step moves the weights by `lr · g` at first (Keras's SGD), else None.

    With momentum, later steps move them further (up to `lr/(1−momentum)·g`);
    the first step, the one a too-large learning rate ruins, is `lr · g`
    exactly. Adaptive optimizers (Adam and the like) scale each step by their
    own statistics: None.

    Args:
        optimizer: The optimizer applying the updates.

    Returns:
        The learning rate as a tensor, or None.
    """
    if type(optimizer) is not keras.optimizers.SGD:
        return None
    return keras.ops.convert_to_tensor(optimizer.learning_rate)


class ClipHooks:
    """What AutoClip's in-step part is on either backend: its hooks, and the parts the step uses.

    Args:
        switch: The `ClipSwitch` that decides each step.
        policy: The clipping policy (also the switch's).
        trigger: The trigger policy, or None.
        records: The `ClipRecords` whose buffers the step writes.

    Example:

    ```python
    step = ClipStep(switch, policy, trigger, records)   # or jax_step.JaxClipStep
    step.state = clip_state                 # the saved state (`AutoClip.set_model`)
    if step.install(optimizer, model):      # the next traced train step clips
        ...
    step.uninstall()
    ```
    """

    def __init__(self, switch, policy, trigger, records):
        self.switch, self.policy, self.trigger, self.records = switch, policy, trigger, records
        self.state = None  # the saved state, set by `AutoClip.set_model`
        self.optimizer = None  # the optimizer applying the updates
        self.model = None  # the model the hooks were installed for
        self.patches = Patches()
        self.trace_count = 0

    def installed_for(self, optimizer, model):
        """Whether the hooks are on `optimizer`, installed for `model`."""
        # A later fit of the same compiled model reuses the traced function: no retrace.
        return bool(self.patches) and self.optimizer is optimizer and self.model is model

    def install(self, optimizer, model):
        """Installs the hooks and makes new record buffers; returns whether it could (else it warned)."""
        raise NotImplementedError

    def uninstall(self):
        """Removes the hooks. Idempotent.

        Returns:
            Whether there were hooks to remove.
        """
        had_hooks = bool(self.patches)
        self.patches.undo_all()
        self.optimizer = None
        return had_hooks

    def _allocate_and_bind(self, model):
        self.records.allocate(model)
        self.policy.bind(model)
        if self.trigger is not None:
            self.trigger.bind(model)


class ClipStep(ClipHooks):
    """AutoClip's hooks on one TensorFlow optimizer, and the step they run (see `ClipHooks`)."""

    def __init__(self, switch, policy, trigger, records):
        super().__init__(switch, policy, trigger, records)
        self._flag = threading.local()
        self._clip_in_update = False  # set by `install`

    def install(self, optimizer, model):
        """Installs the hooks on `optimizer` and makes new record buffers.

        Args:
            optimizer: The optimizer applying the updates.
            model: The model being fit.

        Returns:
            Whether the hooks were installed (False, with a warning, on a
            Keras version whose optimizer they cannot hook).
        """
        stages = _keras_compat.aggregated_gradient_stages(optimizer)
        if stages is None:
            warnings.warn(
                f"AutoClip cannot hook the optimizer of Keras {keras.__version__} (tested: "
                f"{', '.join(_keras_compat.TESTED_KERAS_VERSIONS)}.x); training runs without it.",
                stacklevel=4,
            )
            return False
        self.optimizer = optimizer
        self.model = model
        self._allocate_and_bind(model)
        self.patches.add(stages.add(self._stage, _keras_compat.CLIP))
        self._clip_in_update = False
        if self.policy.skip_nonfinite:
            masked = bool(getattr(model, "jit_compile", False))
            remove = _keras_compat.install_update_guard(optimizer, self._take_flag, masked=masked)
            if remove is None:
                warnings.warn("AutoClip cannot skip non-finite steps on this Keras version; they are applied.",
                              stacklevel=4)
            else:
                self.patches.add(remove)
                # A unit-wise clip (AGC) counts what it clipped inside its branch: it keeps its own.
                self._clip_in_update = (not masked and not self.policy.lazy
                                        and model.distribute_strategy.num_replicas_in_sync == 1)
        return True

    def _take_flag(self):
        flag = getattr(self._flag, "value", None)
        self._flag.value = None
        return flag

    # In the train step ---------------------------------------------------------------

    def _stage(self, grads, variables):
        """The CLIP stage: runs on the replica-summed, unscaled gradient, before the update."""
        self.trace_count += 1
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return None
        with tf.name_scope("keras_vg_autoclip"):
            new_grads = list(grads)
            for i, g in zip(present, self._decide([grads[i] for i in present], [variables[i] for i in present])):
                new_grads[i] = g
        return new_grads

    def _decide(self, grads, variables):
        """Decides about this step and records it; returns the gradients to pass on.

        Where the update guard can take it (one replica, no XLA, skipping
        on), the clip is handed to the guard's conditional, which already
        chooses between updating and skipping: one conditional on the
        gradients per step, not two. Otherwise the clip is a lowered
        conditional here.
        """
        state = self.state.read()
        norm, finite = global_norm(grads)
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        step_size = sgd_step_size(self.optimizer)
        weight_norm = self.records.buffers["weight_norm"].read_value() if step_size is not None else None
        decision, new_state = self.switch.update(state, norm, finite, step, step_size, weight_norm, grads, variables)

        def clip(gradients):
            return self._clip(decision, norm, gradients, variables)

        if self._clip_in_update:
            self._flag.value = _keras_compat.UpdatePlan(finite, decision.clip, lambda g: clip(g)[0])
            clipped, norm_after = decision.clip, decision.norm_after
        else:
            # While nothing is clipped, the step pays for the conditional's switches, not for a pass
            # over the gradient.
            grads, clipped, norm_after = tf.cond(
                decision.clip, lambda: clip(grads), lambda: (list(grads), tf.constant(False), decision.norm_after))
            if self.policy.skip_nonfinite:
                self._flag.value = finite
        if self.policy.lazy:
            new_state = self.switch.count_clipped(state, new_state, clipped)
        self.state.write(new_state)
        self.records.write_step(step, norm, norm_after, decision, clipped)
        return grads

    def _clip(self, decision, norm, grads, variables):
        """The clipping branch: `(grads, clipped, norm_after)`.

        With SGD it also measures ‖W‖ for the guard's rules, here where the
        step pays for a clip anyway: the next steps judge against it.
        """
        if sgd_step_size(self.optimizer) is not None:
            self.records.buffers["weight_norm"].assign(weights_norm(variables))
        if not self.policy.lazy:
            return scale_gradients(grads, decision.factor), tf.constant(True), decision.norm_after
        # A unit-wise policy (AGC) on top of the global bounds: each unit takes the smaller factor.
        unitwise, _ = self.policy.update({}, norm, grads, variables)
        factors = [decision.factor if f is None else tf.minimum(f, decision.factor) for f in unitwise.factor]
        clipped = scale_gradients(grads, factors)
        after, _ = global_norm([g for g in clipped if g is not None])
        return clipped, unitwise.exceeded | (decision.factor < 1.0), after
