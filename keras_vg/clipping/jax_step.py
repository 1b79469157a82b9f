"""AutoClip's part in Keras's JAX train step: the same decision, carried through Keras's stateless state.

Keras's JAX trainer is stateless: `train_step(state, data)` takes every
variable's value and returns new ones, and `fit` threads them from one jitted
step to the next. AutoClip's state (`JaxClipState`) and its record
buffers are therefore the variables of metrics attached to the model, and two
wrappers act in the step:

- `model.train_step`: takes AutoClip's values from the metrics' state it is
  given, and puts the new ones into the state it returns;
- the optimizer's `stateless_apply`: decides on the gradient Keras hands it
  (`ClipSwitch.update`, the decision TensorFlow runs too), scales it, and
  where a non-finite step is skipped, keeps the weights and every slot as
  they were while `iterations` advances.

Everything is in the jitted step: no host callback, no host sync, and no
retrace when clipping switches. While nothing is clipped the gradient is
multiplied by one, which XLA fuses into the optimizer's update, rather than
branching (an XLA conditional on a GPU may wait for its predicate on the
host); only ‖W‖ with SGD and AGC's unit-wise clip, work that only a
clipping step needs, sit in a `lax.cond` (docs/PERFORMANCE.md). Under
`keras.distribution.DataParallel` the step sees the gradient of the global
batch, so the decisions and records are the global ones. Under a
`LossScaleOptimizer` a step whose scaled gradient overflowed is left to it
(it skips the step and lowers the scale): AutoClip does not see that step,
as on TensorFlow.
"""

import threading
import weakref

import jax
import jax.numpy as jnp
import keras
from keras import ops

from keras_vg import _keras_compat
from keras_vg.clipping.in_step import ClipHooks, sgd_step_size
from keras_vg.clipping.policy import scale_gradients, weights_norm
from keras_vg.clipping.saved_state import PackedState
from keras_vg.jax_tap import BuffersMetric


def global_norm(grads):
    """The global L2 norm of the gradients in float32, and whether it is finite (as on TensorFlow).

    Args:
        grads: A non-empty list of arrays.

    Returns:
        `(norm, finite)`: a float32 scalar and a bool scalar.

    Example:

    >>> norm, finite = global_norm([jnp.array([3.0]), jnp.array([4.0])])
    >>> float(norm), bool(finite)
    (5.0, True)
    """
    norm = weights_norm(grads)
    return norm, ops.isfinite(norm)


class JaxClipState(PackedState, BuffersMetric):
    """AutoClip's saved state on JAX: the variables of a metric attached to the model, which Keras threads.

    The train step reads the packed vectors from the metrics' state it is
    given (`unpack`) and returns new ones (`pack`); weight files keep one
    entry per name, as on TensorFlow (`saved_state.ClipState`).

    Args:
        model: The model it is attached to (mid-epoch, its values live in
            Keras's training state, read through `_keras_compat`).
        key: The configuration the state belongs to.
        initial: As `ClipSwitch.init()` returns it; integers are kept in
            int32 unless JAX runs in 64 bits (as Keras's own `iterations`).

    Example:

    ```python
    state = JaxClipState(model, key, switch.init())
    state.numpy()["active"]   # 0: armed
    ```
    """

    def __init__(self, model, key, initial):
        super().__init__("keras_vg_autoclip", {})
        # Not an attribute holding the model: saving walks a metric's attributes, and would loop.
        model_ref = weakref.ref(model)
        self._read_numpy = lambda variable: _keras_compat.read_variable(model_ref(), variable)
        self._lay_out(key, initial, "int64" if jax.config.jax_enable_x64 else "int32")
        self.packed = {}
        for kind in self._order:
            flat = self._pack_numpy(initial, kind)
            self.packed[kind] = self.add_buffer(kind, flat.shape, kind, flat)


class _InStep(threading.local):
    """What the `train_step` wrapper hands the `stateless_apply` wrapper while a step is traced."""

    def __init__(self):
        self.metrics = None  # the metrics' values the step was given
        self.positions = None  # where AutoClip's variables are among them
        self.written = None  # position -> new value, once the optimizer decided


class JaxClipStep(ClipHooks):
    """AutoClip's wrappers on one model and its optimizer, and the step they run, on JAX (see `ClipHooks`)."""

    def __init__(self, switch, policy, trigger, records):
        super().__init__(switch, policy, trigger, records)
        self._in_step = _InStep()

    def install(self, optimizer, model):
        """Makes new record buffers and wraps the model's `train_step` and its optimizer's `stateless_apply`.

        Args:
            optimizer: The optimizer applying the updates.
            model: The model being fit.

        Returns:
            True.
        """
        _keras_compat.warn_if_jax_untested()
        self.optimizer, self.model = optimizer, model
        self._allocate_and_bind(model)
        self.patches.wrap(model, "train_step", self._train_step)
        # The loss scaler's own method: it unscales and checks the gradient inside a conditional,
        # which no value made in the step may leave.
        self.patches.wrap(model.optimizer, "stateless_apply", self._stateless_apply)
        return True

    # In the train step ---------------------------------------------------------------

    def _positions(self):
        ids = {id(v): i for i, v in enumerate(self.model.metrics_variables)}
        positions = {("state", kind): ids[id(v)] for kind, v in self.state.packed.items()}
        positions.update({name: ids[id(v)] for name, v in self.records.buffers.items()})
        return positions

    def _train_step(self, original):
        def train_step(state, data):
            in_step = self._in_step
            if in_step.metrics is not None:
                return original(state, data)
            self.trace_count += 1
            in_step.metrics, in_step.positions, in_step.written = state[3], self._positions(), None
            try:
                logs, state = original(state, data)
                written = in_step.written
            finally:
                in_step.metrics = in_step.positions = in_step.written = None
            if written is None:
                return logs, state  # a train step that never reached the optimizer: nothing decided
            trainable, non_trainable, optimizer_variables, metrics = state
            metrics = list(metrics)
            for position, value in written.items():
                metrics[position] = value
            return logs, (trainable, non_trainable, optimizer_variables, metrics)

        return train_step

    def _stateless_apply(self, original):
        def stateless_apply(optimizer_variables, grads, trainable_variables):
            in_step = self._in_step
            if in_step.metrics is None or in_step.written is not None:
                return original(optimizer_variables, grads, trainable_variables)
            outer = self.model.optimizer
            variables = _keras_compat.optimizer_trainable_variables(self.optimizer)
            mapping = list(zip(variables, trainable_variables)) + list(zip(outer.variables, optimizer_variables))
            with keras.StatelessScope(state_mapping=mapping):
                grads, decided = self._decide(list(grads), variables)
            new_trainable, new_optimizer = original(optimizer_variables, grads, trainable_variables)
            skipped, seen = decided
            if self.policy.skip_nonfinite and seen is None:  # a loss scaler skips its own non-finite steps
                new_trainable = [jnp.where(skipped, old, new) for old, new in zip(trainable_variables, new_trainable)]
                # Every slot stays as it was; the step count advances (see `AutoClip`).
                iterations = [i for i, v in enumerate(outer.variables) if v is self.optimizer.iterations]
                new_optimizer = [new if i in iterations else jnp.where(skipped, old, new)
                                 for i, (old, new) in enumerate(zip(optimizer_variables, new_optimizer))]
            if seen is not None:  # under a loss scaler, a step it skips is not AutoClip's
                in_step.written = {position: jnp.where(seen, value, in_step.metrics[position])
                                   for position, value in in_step.written.items()}
            return new_trainable, new_optimizer

        return stateless_apply

    def _decide(self, grads, variables):
        """Decides about this step, notes the new state and records; returns the gradients to apply.

        Runs inside a `StatelessScope` that maps the optimizer's and the
        weights' variables to this step's values.

        Returns:
            `(grads, (skipped, seen))`: `seen` is None, or under a loss scaler
            whether the scaled gradient was finite.
        """
        metrics, positions = self._in_step.metrics, self._in_step.positions
        state = self.state.unpack({kind: metrics[positions[("state", kind)]] for kind in self.state.packed})
        present = [i for i, g in enumerate(grads) if g is not None]
        norm, finite = global_norm([grads[i] for i in present])
        seen = None
        scale = getattr(self.model.optimizer, "dynamic_scale", None)
        if scale is not None and self.model.optimizer is not self.optimizer:
            seen = finite
            norm = norm / ops.cast(scale, "float32")  # the unscaled gradient's norm
        step = ops.convert_to_tensor(self.optimizer.iterations)
        step_size = sgd_step_size(self.optimizer)
        weight_norm = metrics[positions["weight_norm"]]
        decision, new_state = self.switch.update(
            state, norm, finite, step, step_size, weight_norm if step_size is not None else None,
            [grads[i] for i in present], [variables[i] for i in present])
        if not self.policy.lazy:
            # One factor for all, 1 while nothing is clipped: XLA fuses it into the update.
            grads = scale_gradients(grads, decision.factor)
            clipped, norm_after = decision.clip, decision.norm_after
        else:
            grads, clipped, norm_after = self._unitwise(decision, norm, grads, variables, present)
            new_state = self.switch.count_clipped(state, new_state, clipped)
        written = {positions[("state", kind)]: value for kind, value in self.state.pack(new_state).items()}
        buffers = {name: metrics[positions[name]] for name in ("records", "events", "counts")}
        values = self.records.step_values(buffers, step, norm, norm_after, decision, clipped)
        written.update({positions[name]: value for name, value in values.items()})
        if step_size is not None:
            # With SGD the guard's rules judge against ‖W‖; measured where the step clips anyway.
            written[positions["weight_norm"]] = jax.lax.cond(
                decision.clip, lambda: weights_norm([variables[i] for i in present]), lambda: weight_norm)
        self._in_step.written = written
        return grads, (decision.skipped, seen)

    def _unitwise(self, decision, norm, grads, variables, present):
        """A unit-wise policy (AGC) on top of the global bounds, computed only on steps that clip."""
        def clip():
            kept = [grads[i] for i in present]
            unitwise, _ = self.policy.update({}, norm, kept, [variables[i] for i in present])
            factors = [decision.factor if f is None else ops.minimum(f, decision.factor) for f in unitwise.factor]
            clipped = scale_gradients(kept, factors)
            after, _ = global_norm(clipped)
            return clipped, unitwise.exceeded | (decision.factor < 1.0), after

        def keep():
            return [grads[i] for i in present], jnp.array(False), decision.norm_after

        kept, clipped, norm_after = jax.lax.cond(decision.clip, clip, keep)
        grads = list(grads)
        for i, g in zip(present, kept):
            grads[i] = g
        return grads, clipped, norm_after
