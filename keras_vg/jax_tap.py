"""The in-graph tap on Keras's JAX backend: the same records, carried out through Keras's own state.

Keras's JAX trainer is stateless: `train_step(state, data)` takes the model's,
the optimizer's and the metrics' variables as arrays and returns new ones, and
`fit` threads them from one jitted step to the next. The record buffers
(`keras_vg.record_buffers`) are therefore the variables of a metric attached
to the model (`BuffersMetric`): Keras carries them through every step like
its own metrics, with no host callback and no host sync.

As on TensorFlow, steps that record nothing run the train function Keras
built; record steps run one Keras builds around the instrumented step, which
calls the model's own `train_step` and adds the record to the state it
returns:

- gradients, and the weights before and after the update, are taken where the
  train step hands them to `optimizer.stateless_apply` (wrapped; it passes
  straight through outside the instrumented step);
- activations are measured in the layers' calls, inside the function Keras
  differentiates, and leave it through the metrics' state it returns
  (`compute_loss_and_updates`, wrapped the same way).

Under `keras.distribution.DataParallel` the jitted step sees the global batch
and the gradient summed over devices: the records are the global ones.
"""

import functools
import threading

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_vg import _keras_compat
from keras_vg.layers import unit_axis
from keras_vg.nonfinite_watch import loss_tracker
from keras_vg.patches import Patches
from keras_vg.record_buffers import RecordBuffers
from keras_vg.tap_settings import TapSettings

_TINY = 1.2e-31
"""Below `size · _TINY` a sum of squares may have lost squares to underflow (see `keras_vg.stats`)."""


class BuffersMetric(keras.metrics.Metric):
    """Device buffers, as a metric's variables: Keras threads them through its stateless step.

    It never resets (Keras resets metrics at each epoch) and reports nothing
    in the logs. The monitor's records and AutoClip's live in one each.

    Args:
        name: The metric's name.
        specs: A dict from key to `(shape, dtype name, initial value)`: a
            number, or a numpy array of that shape. "int64" and "float64" are
            kept in 32 bits unless JAX runs in 64 bits, as Keras's own
            `iterations` is.
    """

    def __init__(self, name, specs):
        super().__init__(name=name)
        self.buffers = {}
        for key, (shape, dtype, initial) in specs.items():
            self.add_buffer(key, shape, dtype, initial)

    def add_buffer(self, key, shape, dtype, initial):
        """Adds one buffer (as one of `specs`) and returns its variable."""
        wide = jax.config.jax_enable_x64
        dtype = {"int64": "int64" if wide else "int32", "float64": "float64" if wide else "float32"}.get(dtype, dtype)
        self.buffers[key] = self.add_variable(shape=tuple(shape), dtype=dtype, name=key, initializer="zeros")
        self.buffers[key].assign(np.broadcast_to(initial, tuple(shape)))
        return self.buffers[key]

    def update_state(self, *args, **kwargs):
        del args, kwargs

    def reset_state(self):
        pass

    def result(self):
        return {}


class _Captured(threading.local):
    """What the instrumented step's wrappers saw while it was being traced."""

    def __init__(self):
        self.activations = []
        self.update = None  # (grads, weights before, weights after, optimizer variables)


def _gradient_statistics(grads):
    """Norms, largest absolute values and NaN/inf counts, in one pass over each gradient where XLA fuses them."""
    grads = [g.astype(jnp.float32) for g in grads]
    sums = jnp.stack([jnp.sum(jnp.square(g)) for g in grads])
    max_abs = jnp.stack([jnp.max(jnp.abs(g)) if g.size else jnp.float32(0) for g in grads])
    nonfinite = jnp.stack([jnp.sum(~jnp.isfinite(g)).astype(jnp.float32) for g in grads])
    sizes = jnp.array([g.size for g in grads], jnp.float32)
    exact = (jnp.isfinite(sums) & (sums > sizes * _TINY)) | (max_abs == 0) | (nonfinite > 0)

    def rescaled(_):
        # The rare step with a norm past float32's range or lost to underflow pays one more pass.
        scale = jnp.where(max_abs > 0, max_abs, 1.0)
        again = scale * jnp.sqrt(jnp.stack([jnp.sum(jnp.square(g / scale[i])) for i, g in enumerate(grads)]))
        return jnp.where(exact, jnp.sqrt(sums), again)

    norms = jax.lax.cond(jnp.all(exact), lambda _: jnp.sqrt(sums), rescaled, None)
    return norms, max_abs, nonfinite


def _global_norm(norms):
    peak = jnp.max(norms)
    scale = jnp.where((peak > 0) & jnp.isfinite(peak), peak, 1.0)
    return scale * jnp.sqrt(jnp.sum(jnp.square(norms / scale)))


def _weight_statistics(before, after):
    """`(‖w‖, ‖w_after − w_before‖ / ‖w‖)` per variable (NaN where ‖w‖ = 0)."""
    before = [w.astype(jnp.float32) for w in before]
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(w))) for w in before])
    changes = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32) - w))) for a, w in zip(after, before)])
    return norms, jnp.where(norms > 0, changes / jnp.where(norms > 0, norms, 1.0), jnp.nan)


def _passing_units(outputs, gate, axis):
    """As `keras_vg.stats.passing_units`: 1.0 per unit that passed gradient on some sample."""
    axis = axis % outputs.ndim
    axes = tuple(a for a in range(outputs.ndim) if a != axis)
    if gate.high is None:
        return (jnp.max(outputs, axis=axes) > gate.low).astype(jnp.float32)
    return jnp.any((outputs > gate.low) & (outputs < gate.high), axis=axes).astype(jnp.float32)


def _saturated_count(outputs, kind, epsilon):
    """As `keras_vg.stats.saturated_count`: `[saturated, total]`."""
    centre, half_range = (0.5, 0.5) if kind == "sigmoid" else (0.0, 1.0)
    saturated = jnp.square(outputs.astype(jnp.float32) - centre) > (half_range - epsilon) ** 2
    return jnp.stack([jnp.sum(saturated.astype(jnp.float32)), jnp.float32(outputs.size)])


def _write(buffer, row, slot, is_record):
    """`buffer` with row `slot` set to `row`, where `is_record` (None: always)."""
    updated = buffer.at[slot].set(jnp.asarray(row, buffer.dtype))
    return updated if is_record is None else jnp.where(is_record, updated, buffer)


class JaxTap(TapSettings):
    """Records per-variable and per-layer statistics in an instrumented JAX train function.

    The same interface as `keras_vg.tap.Tap`, which documents the arguments.
    The model is built when `fit` calls the callbacks (Keras's JAX trainer
    builds it first), so the buffers are made at `install`.

    Example:

    >>> tap = JaxTap(model, every=10, capacity=40, stats_to_record=["grad_norm"])  # doctest: +SKIP
    >>> tap.install(); instrumented = tap.make_train_function()                       # doctest: +SKIP
    """

    def __init__(self, model, every, capacity, stats_to_record, saturation_epsilon=0.01):
        super().__init__(model, every, capacity, stats_to_record, saturation_epsilon, model.optimizer)
        self.trace_count = 0
        self.applied = False
        self.records = None
        self.buffers = None
        self._recording = False
        self._captured = _Captured()
        self._patches = Patches()

    def install(self):
        """Makes the buffers and wraps the optimizer, the loss computation and the activation layers."""
        _keras_compat.warn_if_jax_untested()
        self.variables = list(self.model.trainable_variables)
        self._loss_tracker = loss_tracker(self.model)
        self.records = RecordBuffers(self.stats_to_record, [v.path for v in self.variables],
                                     [layer.name for layer, _ in self.dead_layers],
                                     [layer.name for layer, _ in self.saturation_layers],
                                     self.capacity, with_loss=self._loss_tracker is not None)
        self._metric = _keras_compat.attach_metric(self.model, "_keras_vg_records",
                                                   BuffersMetric("keras_vg_records", self.records.specs()))
        self.buffers = self._metric.buffers
        # Under a distribution, Keras fixes the state's shardings when it makes the train function:
        # its own must be made again, now that the state holds the records.
        self.model.make_train_function(force=True)
        self._patches.wrap(self.optimizer, "stateless_apply", self._stateless_apply)
        self._patches.wrap(self.model, "compute_loss_and_updates", self._compute_loss_and_updates)
        for index, (layer, gate) in enumerate(self.dead_layers):
            measure = functools.partial(_passing_units, gate=gate, axis=unit_axis(layer))
            self._patches.wrap(layer, "call", self._activation_call("dead", index, measure))
        for index, (layer, kind) in enumerate(self.saturation_layers):
            measure = functools.partial(_saturated_count, kind=kind, epsilon=self.saturation_epsilon)
            self._patches.wrap(layer, "call", self._activation_call("saturated", index, measure))

    def uninstall(self):
        """Restores every wrapped method; the records metric stays, passing through. Idempotent."""
        self._patches.undo_all()

    def make_train_function(self):
        """Returns the instrumented train function, built by Keras like its own (jitted at its first call)."""
        return _keras_compat.train_function_with_step(self.model, self._instrumented_step)

    # In the instrumented step --------------------------------------------------------

    def _metric_positions(self):
        ids = {id(v): i for i, v in enumerate(self.model.metrics_variables)}
        return {key: ids[id(variable)] for key, variable in self.buffers.items()}

    def _record_point(self, optimizer_variables, metrics_variables, positions):
        step = optimizer_variables[_index_of(self.optimizer.variables, self.optimizer.iterations)]
        slot = metrics_variables[positions["count"]] % self.capacity
        if self.steps_per_execution == 1 or self.every == 1:
            return step, slot, None
        return step, slot, step % self.every == 0

    def _instrumented_step(self, state, data):
        self.trace_count += 1
        positions = self._metric_positions()
        _, _, optimizer_before, metrics_before = state
        self._recording = True
        self._captured.activations, self._captured.update = [], None
        self._point = self._record_point(optimizer_before, metrics_before, positions)
        try:
            logs, state = self.model.train_step(state, data)
        finally:
            self._recording = False
        trainable, non_trainable, optimizer_variables, metrics = state
        metrics = list(metrics)
        step, slot, is_record = self._point
        if self._captured.update is not None:
            self.applied = True
            self._write_update(metrics, positions, slot, is_record)
        if self.records.with_loss:
            total = metrics[_index_of(self.model.metrics_variables, self._loss_tracker.total)]
            position = positions["loss_finite"]
            metrics[position] = _write(metrics[position], jnp.isfinite(total).astype(jnp.float32), slot, is_record)
        metrics[positions["steps"]] = _write(metrics[positions["steps"]], step, slot, is_record)
        recorded = 1 if is_record is None else is_record.astype(metrics[positions["count"]].dtype)
        metrics[positions["count"]] = metrics[positions["count"]] + recorded
        return logs, (trainable, non_trainable, optimizer_variables, metrics)

    def _write_update(self, metrics, positions, slot, is_record):
        grads, before, after = self._captured.update
        if self.records.gradient_rows or self.records.records_global_norm:
            norms, max_abs, nonfinite = _gradient_statistics(grads)
            measured = {"grad_norm": norms, "grad_max_abs": max_abs, "grad_nonfinite": nonfinite}
            if self.records.gradient_rows:
                rows = jnp.stack([measured[name] for name in self.records.gradient_rows])
                position = positions["gradients"]
                metrics[position] = _write(metrics[position], rows, slot, is_record)
            if self.records.records_global_norm:
                position = positions["global_grad_norm"]
                metrics[position] = _write(metrics[position], _global_norm(norms), slot, is_record)
        if self.records.records_weights:
            position = positions["weights"]
            metrics[position] = _write(metrics[position], jnp.stack(_weight_statistics(before, after)), slot,
                                       is_record)

    def _stateless_apply(self, original):
        def stateless_apply(optimizer_variables, grads, trainable_variables):
            new_trainable, new_optimizer = original(optimizer_variables, grads, trainable_variables)
            if self._recording:
                grads = list(grads)
                scale = _loss_scale(self.optimizer, optimizer_variables)
                if scale is not None:  # a LossScaleOptimizer receives the scaled gradient
                    grads = [g / scale.astype(g.dtype) for g in grads]
                self._captured.update = (grads, list(trainable_variables), list(new_trainable))
            return new_trainable, new_optimizer

        return stateless_apply

    def _activation_call(self, kind, index, measure):
        def make(original):
            def call(*args, **kwargs):
                outputs = original(*args, **kwargs)
                if self._recording and isinstance(outputs, jax.Array):
                    self._captured.activations.append((kind, index, measure(outputs)))
                return outputs

            return call

        return make

    def _compute_loss_and_updates(self, original):
        def compute_loss_and_updates(*args, **kwargs):
            loss, aux = original(*args, **kwargs)
            if not self._recording or "layers" not in self.buffers:
                return loss, aux
            # The activations' tracers cannot leave the differentiated function but through its
            # outputs: the layer row goes out in the metrics' state, as the loss tracker's does.
            unscaled_loss, y_pred, non_trainable, metrics = aux
            metrics = list(metrics)
            _, slot, is_record = self._point
            position = self._metric_positions()["layers"]
            row = jax.lax.stop_gradient(self._layer_row())
            metrics[position] = _write(metrics[position], row, slot, is_record)
            return loss, (unscaled_loss, y_pred, non_trainable, metrics)

        return compute_loss_and_updates

    def _layer_row(self):
        taken = {"dead": {}, "saturated": {}}
        for kind, index, value in self._captured.activations:
            by_layer = taken[kind]
            # A layer called twice in a step: marks and counts add up.
            by_layer[index] = by_layer[index] + value if index in by_layer else value
        self._captured.activations = []
        row = []
        for index in range(len(self.dead_layers)):
            marks = taken["dead"].get(index)
            row.append(jnp.float32(np.nan) if marks is None else jnp.mean((marks == 0).astype(jnp.float32)))
        for index in range(len(self.saturation_layers)):
            counts = taken["saturated"].get(index)
            row.append(jnp.float32(np.nan) if counts is None else counts[0] / counts[1])
        return jnp.stack(row)

    # Host side -----------------------------------------------------------------------

    def read_new(self):
        """Reads the buffers once and returns the records not read before (`RecordBuffers.read`)."""
        return self.records.read({key: _keras_compat.read_variable(self.model, variable)
                                  for key, variable in self.buffers.items()})

    def names_for(self, name):
        """Returns the names a statistic's vector runs along (variable paths or layer names)."""
        return self.records.names_for(name)

    def is_model(self, model):
        """Whether this tap records `model` with its current optimizer."""
        return self.model is model and self.optimizer is model.optimizer


def _index_of(variables, variable):
    return next(i for i, v in enumerate(variables) if v is variable)


def _loss_scale(optimizer, optimizer_variables):
    """The loss scale in this step's optimizer state, for a `LossScaleOptimizer`; else None."""
    scale = getattr(optimizer, "dynamic_scale", None)
    if scale is None or getattr(optimizer, "inner_optimizer", None) is None:
        return None
    return optimizer_variables[_index_of(optimizer.variables, scale)]

