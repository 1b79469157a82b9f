"""The in-graph tap: records gradient health in a second, instrumented train function.

Steps that record nothing run the train function Keras built, with no op of
ours in it. Record steps run another one, built by Keras around the same
train step (`Tap.make_train_function`); the `GradientMonitor` picks one of the
two per batch on the host. The tap wraps the optimizer instance (and the
`call` of activation layers), but the wrappers only act while the
instrumented function is being traced: in any other function they pass
straight through.

In the instrumented step the statistics are computed from the very tensors
the step already has, with plain ops (no host sync, no summary, no Python
per step once traced), and written as one row of small `tf.Variable` ring
buffers, which the host reads back in batches. This is what makes it work
under `tf.function`, XLA and `tf.distribute`.

Buffer variables are `SyncOnRead` with `ONLY_FIRST_REPLICA` aggregation: every
replica computes the same row (gradient statistics from the replica-summed
gradient, activation counts all-reduced) and writes its own copy without
communication.
"""

import functools
import threading
import warnings

import numpy as np
import tensorflow as tf

from keras_vg import _keras_compat, stats
from keras_vg import format as fmt
from keras_vg.device_buffers import SPARE_ROWS, ring_slot, sync_on_read, write_row
from keras_vg.layers import unit_axis
from keras_vg.nonfinite_watch import loss_tracker
from keras_vg.patches import Patches
from keras_vg.record_buffers import RecordBuffers
from keras_vg.tap_settings import TapSettings
from keras_vg.weight_updates import UpdateMeter, backend_value

__all__ = ["Tap"]


class _StepContext(threading.local):
    """What the layer calls of the step being traced measured, per thread.

    MirroredStrategy traces each replica's step in a thread of its own.
    """

    def __init__(self):
        self.activations = []  # (kind, layer index, tensor)


def _usable_here(tensor):
    """Whether `tensor` can be used in the graph being built: its own, or one nested inside it."""
    if tf.executing_eagerly():
        return True
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        if graph is tensor.graph:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _make_buffer(key, spec):
    """One of `RecordBuffers.specs()` as a device ring buffer (`keras_vg.device_buffers`), spare row included."""
    shape, dtype, initial = spec
    if key != "count":  # every buffer but the counter is a ring of rows
        shape = [shape[0] + SPARE_ROWS] + list(shape[1:])
    # Made during the first trace for a model built by it: a variable that tf.function
    # captures as created in the trace would make it trace the step a second time.
    return sync_on_read(tf.fill(shape, tf.constant(initial, dtype)), "keras_vg_buffer", lift=False)


class Tap(TapSettings):
    """Records per-variable and per-layer statistics in an instrumented train function.

    The variables recorded are those the train step updates, found when the
    instrumented function is first traced: a model that is not built before
    `fit` is built by then. Under a distribution strategy, Keras builds the
    model before `fit` calls any callback, and the buffers are made at once
    (a replica cannot create variables).

    Args:
        model: A Keras model compiled with a Keras optimizer, built or not.
        every: Steps whose `iterations` are multiples of `every` are
            recorded; with `steps_per_execution > 1` the instrumented
            function runs whole executions and writes only those steps.
        capacity: Rows of the ring buffers: at least the number of
            recorded steps between two host reads.
        stats_to_record: Names from `keras_vg.format.MONITOR_STATS`.
        saturation_epsilon: Distance to an asymptote that counts as saturated.

    Example:

    >>> tap = Tap(model, every=10, capacity=40, stats_to_record=fmt.MONITOR_STATS)  # doctest: +SKIP
    >>> tap.install(); instrumented = tap.make_train_function()                    # doctest: +SKIP
    >>> records = tap.read_new()  # after some record steps ran `instrumented`    # doctest: +SKIP
    """

    def __init__(self, model, every, capacity, stats_to_record, saturation_epsilon=0.01):
        super().__init__(model, every, capacity, stats_to_record, saturation_epsilon,
                         _keras_compat.applying_optimizer(model.optimizer))
        self.variables = None
        self.records = None
        self.buffers = None
        self.trace_count = 0
        self.applied = False
        self._recording = 0
        self._recording_lock = threading.Lock()
        self._set_up_lock = threading.Lock()
        self._step_context = _StepContext()
        self._unreadable = set()
        self._patches = Patches()

    # Set-up -----------------------------------------------------------------

    def install(self):
        """Wraps the optimizer and the activation layers; under a strategy, makes the buffers.

        The wrappers act only while `make_train_function`'s function is traced.
        """
        self._patches.wrap(self.optimizer, "apply", self._apply)
        for index, (layer, gate) in enumerate(self.dead_layers):
            measure_dead = functools.partial(stats.passing_units, gate=gate, unit_axis=unit_axis(layer))
            self._patches.wrap(layer, "call", self._activation_call("dead", index, measure_dead))
        for index, (layer, kind) in enumerate(self.saturation_layers):
            def measure_saturation(outputs, kind=kind):
                return tf.stack(stats.saturated_count(outputs, kind, self.saturation_epsilon))

            self._patches.wrap(layer, "call", self._activation_call("saturated", index, measure_saturation))
        strategy = self.model.distribute_strategy
        self._replicas = strategy.num_replicas_in_sync
        # Gradient statistics are taken in `apply` on one replica (before any Keras
        # clipping); under a strategy, from the replica-summed gradient, through the
        # private hook or, where it is unavailable, an all-reduce of our own.
        self._gradients_in_apply = any(s in self.stats_to_record for s in fmt.GRADIENT_STATS)
        self._all_reduce_in_apply = False
        if self._replicas > 1:
            if self._gradients_in_apply:
                stages = _keras_compat.aggregated_gradient_stages(self.optimizer)
                if stages is not None:
                    self._patches.add(stages.add(self._observe_aggregated, _keras_compat.PRE_CLIP))
                    self._gradients_in_apply = False
                else:
                    self._all_reduce_in_apply = True
            # Keras builds the model before fit under a strategy, and a replica cannot create variables.
            with strategy.scope():
                self._set_up(self.model.trainable_variables)

    def uninstall(self):
        """Restores every wrapped method. Idempotent."""
        self._patches.undo_all()

    def make_train_function(self):
        """Returns the instrumented train function, built by Keras like its own.

        It is traced at its first call; the model's own `train_function` is
        left as it was.
        """
        return _keras_compat.train_function_with_step(self.model, self._instrumented_step)

    def _instrumented_step(self, data):
        self.trace_count += 1
        with self._recording_lock:
            self._recording += 1
        try:
            return self.model.train_step(data)
        finally:
            with self._recording_lock:
                self._recording -= 1

    def _set_up(self, variables):
        """Makes the buffers for these variables (the first trace, or at install under a strategy)."""
        self.variables = list(variables)
        self._index = {}
        for i, variable in enumerate(self.variables):
            self._index[id(variable)] = i
            self._index[id(backend_value(variable))] = i
        self._loss_tracker = loss_tracker(self.model)
        self.records = RecordBuffers(self.stats_to_record, [v.path for v in self.variables],
                                     [layer.name for layer, _ in self.dead_layers],
                                     [layer.name for layer, _ in self.saturation_layers],
                                     self.capacity, with_loss=self._loss_tracker is not None)
        if self.records.records_weights:
            self._update_meter = UpdateMeter(self.optimizer, self.variables, self._position,
                                             distributed=self._replicas > 1)
        self.buffers = {key: _make_buffer(key, spec) for key, spec in self.records.specs().items()}

    def _set_up_in_trace(self, variables):
        with self._set_up_lock:
            if self.buffers is None:
                with tf.init_scope():  # variables made outside the function being traced
                    self._set_up(variables)

    # In the instrumented step -------------------------------------------------

    def _record_point(self):
        """The step (`iterations` before the update), its buffer slot, and whether it is recorded.

        With one step per execution, every step of the instrumented function is
        recorded (None: no mask); with several, those whose `iterations` are
        multiples of `every`.
        """
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        count = self.buffers["count"].read_value()
        if self.steps_per_execution == 1 or self.every == 1:
            return step, ring_slot(count, self.capacity), None
        is_record = tf.equal(step % self.every, 0)
        return step, ring_slot(count, self.capacity, is_record), is_record  # else the spare row

    def _activation_call(self, kind, index, measure):
        """Wraps a layer's `call` to leave `measure(outputs)` of an instrumented training call for `apply`."""
        def make(original):
            def call(*args, **kwargs):
                outputs = original(*args, **kwargs)
                if self._recording and isinstance(outputs, tf.Tensor):
                    with tf.name_scope("keras_vg"):
                        self._step_context.activations.append((kind, index, measure(outputs)))
                return outputs

            return call

        return make

    def _take_activations(self):
        """Takes what the step's layer calls measured: `(dead marks, saturation counts)` by layer index.

        Layer calls come before `apply` in the same graph, so their tensors can
        be used there; those of a layer the model calls inside control flow of
        its own (a `tf.while_loop`) cannot, and are left out with a warning.
        (Keras also calls layers in scratch graphs while it builds a model in
        the step, to infer shapes; those calls come beside a usable one and
        are dropped silently.) A layer called twice in a step adds up what
        both calls measured.
        """
        context = self._step_context
        pending, context.activations = context.activations, []
        taken = {"dead": {}, "saturated": {}}
        unusable = set()
        for kind, index, tensor in pending:
            if not _usable_here(tensor):
                unusable.add((kind, index))
                continue
            by_layer = taken[kind]
            by_layer[index] = by_layer[index] + tensor if index in by_layer else tensor
        for kind, index in sorted(unusable):
            if index not in taken[kind]:
                self._warn_unreadable(kind, index)
        return taken["dead"], taken["saturated"]

    def _warn_unreadable(self, kind, index):
        if (kind, index) in self._unreadable:
            return
        self._unreadable.add((kind, index))
        layer = (self.dead_layers if kind == "dead" else self.saturation_layers)[index][0]
        statistic = "dead_fraction" if kind == "dead" else "saturation_fraction"
        warnings.warn(
            f"GradientMonitor's {statistic} of layer {layer.name!r} leaves out the calls the model makes "
            "inside control flow of its own (a tf.while_loop or tf.cond): their activations cannot be "
            "read where the optimizer step is built.",
            stacklevel=2,
        )

    def _layer_row(self, dead, saturated):
        """The per-layer fractions of this step: dead units, then saturated activations (NaN: not called).

        Under a strategy the marks and counts are summed over replicas first
        (one all-reduce): a unit is dead only if it passed no gradient on any
        replica's samples.
        """
        parts = [dead[i] for i in sorted(dead)] + [saturated[i] for i in sorted(saturated)]
        if self._replicas > 1 and parts:
            sizes = [int(p.shape[0]) for p in parts]
            summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(parts, 0))
            parts = tf.split(summed, sizes)
        values = dict(zip([("dead", i) for i in sorted(dead)] + [("saturated", i) for i in sorted(saturated)], parts))
        row = []
        for i in range(len(self.dead_layers)):
            marks = values.get(("dead", i))
            row.append(tf.constant(np.nan) if marks is None else tf.reduce_mean(tf.cast(marks == 0, tf.float32)))
        for i in range(len(self.saturation_layers)):
            counts = values.get(("saturated", i))
            row.append(tf.constant(np.nan) if counts is None else counts[0] / counts[1])
        return tf.stack(row)

    def _position(self, variable):
        return self._index.get(id(variable), self._index.get(id(backend_value(variable))))

    def _observe_gradients(self, grads, variables):
        """Writes the statistics of the aggregated, unscaled, pre-clip gradients of this step.

        Returns:
            `(norms, row_of)` for `UpdateMeter.around`: the gradients' L2
            norms, and a dict from each gradient tensor's `ref()` to its row;
            None where nothing was measured.
        """
        present = [(g, p) for g, p in zip(grads, map(self._position, variables)) if g is not None and p is not None]
        if not present:
            return None
        tensors = [stats.dense_values(g) for g, _ in present]
        positions = tf.constant([[p] for _, p in present], tf.int32)
        n = len(self.variables)
        _, slot, _ = self._record_point()
        sums = stats.squared_norms(tensors)
        nonfinite = stats.nonfinite_counts(tensors, sums)
        norms, max_abs = stats.norms_and_max_abs(tensors, sums, nonfinite)
        if self.records.gradient_rows:
            measured = {"grad_norm": norms, "grad_max_abs": max_abs, "grad_nonfinite": nonfinite}
            # A variable without a gradient reads 0: nothing flows into it.
            rows = tf.stack([tf.scatter_nd(positions, measured[name], [n]) for name in self.records.gradient_rows])
            write_row(self.buffers["gradients"], rows, slot)
        if "global_grad_norm" in self.buffers:
            write_row(self.buffers["global_grad_norm"], stats.global_norm(norms), slot)
        return norms, {t.ref(): row for row, t in enumerate(tensors) if isinstance(t, tf.Tensor)}

    def _observe_local_gradients(self, grads, variables):
        scale = getattr(self.optimizer, "loss_scale_factor", None)
        if scale is not None:
            grads = [g if g is None else g / scale for g in grads]
        if self._all_reduce_in_apply:
            # Fallback when the private hook is unavailable: one extra all-reduce.
            context = tf.distribute.get_replica_context()
            present = [i for i, g in enumerate(grads) if g is not None]
            reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            for i, g in zip(present, reduced):
                grads[i] = g
        return self._observe_gradients(grads, variables)

    def _observe_aggregated(self, grads, variables):
        if self._recording:
            with tf.name_scope("keras_vg"):
                self._observe_gradients(grads, variables)

    def _apply(self, original):
        def apply(grads, trainable_variables=None):
            if not self._recording:
                return original(grads, trainable_variables)
            self.applied = True
            grads = list(grads)
            variables = list(trainable_variables) if trainable_variables is not None \
                else list(self.model.trainable_variables)
            if self.buffers is None:
                self._set_up_in_trace(variables)
            with tf.name_scope("keras_vg"):
                step, slot, is_record = self._record_point()
                layer_row = self._layer_row(*self._take_activations()) if "layers" in self.buffers else None
                gradient_norms = self._observe_local_gradients(grads, variables) if self._gradients_in_apply else None
            if self.records.records_weights:
                updated = [v for g, v in zip(grads, variables) if g is not None]
                measure = self._update_meter.around(updated, lambda: original(grads, trainable_variables),
                                                    gradient_norms)
            else:
                original(grads, trainable_variables)
            with tf.name_scope("keras_vg"):
                if self.records.records_weights:
                    self._write_update(measure(), slot)
                if layer_row is not None:
                    write_row(self.buffers["layers"], layer_row, slot)
                if "loss_finite" in self.buffers:
                    total = tf.convert_to_tensor(self._loss_tracker.total)
                    write_row(self.buffers["loss_finite"], tf.cast(tf.math.is_finite(total), tf.float32), slot)
                write_row(self.buffers["steps"], step, slot)
                recorded = tf.constant(1, tf.int64) if is_record is None else tf.cast(is_record, tf.int64)
                self.buffers["count"].assign_add(recorded)

        return apply

    def _write_update(self, measured, slot):
        """The weight norm before the update, and the ratio of the change applied (NaN: undefined)."""
        n = len(self.variables)
        if measured is None:
            rows = tf.stack([tf.zeros([n]), tf.fill([n], np.nan)])
        else:
            positions, weight_norms, ratios = measured
            positions = tf.constant([[p] for p in positions], tf.int32)
            # A variable the step did not update: its norm reads 0 and its ratio NaN (undefined), so
            # that a NaN weight norm always means weights that are not finite.
            rows = tf.stack([tf.scatter_nd(positions, weight_norms, [n]),
                             tf.tensor_scatter_nd_update(tf.fill([n], np.nan), positions, ratios)])
        write_row(self.buffers["weights"], rows, slot)

    # Host side -----------------------------------------------------------------

    def read_new(self):
        """Reads the buffers once and returns the records not read before (`RecordBuffers.read`)."""
        if self.buffers is None:
            return []
        # Plain reads, not a tf.function: once per batch of records, and a SyncOnRead
        # variable read from the host is aggregated over replicas as it should be.
        return self.records.read({key: variable.numpy() for key, variable in self.buffers.items()})

    def names_for(self, name):
        """Returns the names a statistic's vector runs along (variable paths or layer names)."""
        return self.records.names_for(name)

    def is_model(self, model):
        """Whether this tap records `model` with its current optimizer."""
        return self.model is model and self.optimizer is _keras_compat.applying_optimizer(model.optimizer)

