"""The in-graph tap: records gradient health inside the compiled train step.

The tap wraps the optimizer instance (and the `call` of activation layers) so
that the statistics are computed from the very tensors the train step already
has. Results go into small `tf.Variable` ring buffers, one row per recorded
step; the host reads them back only when a recorded step has passed. Nothing
here syncs with the host, writes summaries or runs Python per step once traced,
which is what makes it work under `tf.function`, XLA and `tf.distribute`.

Buffer variables are `SyncOnRead`: each replica writes its own copy with no
communication, and a read from the host aggregates them. Gradient statistics
are computed on the replica-summed gradient, so every replica holds the same
values (`ONLY_FIRST_REPLICA`); activation counts differ per replica and are
summed (`SUM`).
"""

import functools
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_vg import _keras_compat, stats
from keras_vg import format as fmt
from keras_vg.weight_updates import UpdateMeter, backend_value

RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "selu", "prelu"})
SATURATING = {"sigmoid": "sigmoid", "hard_sigmoid": "sigmoid", "tanh": "tanh", "hard_tanh": "tanh"}


def activation_name(layer):
    """Returns the name of the activation a layer applies to its output, or None.

    Recurrent layers return None: their `activation` acts inside the cell, not
    on what the layer outputs.
    """
    if isinstance(layer, keras.layers.RNN):
        return None
    activation = getattr(layer, "activation", None)
    if activation is not None:
        name = getattr(activation, "__name__", None) or type(activation).__name__
        return name.lower()
    by_class = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu", "PReLU": "prelu"}
    return by_class.get(type(layer).__name__)


def walk_layers(model):
    """Yields the leaf layers of a model in model order, entering nested models."""
    for layer in model.layers:
        inner = getattr(layer, "layers", None)
        if inner and isinstance(layer, keras.Model):
            yield from walk_layers(layer)
        else:
            yield layer


def _unit_axis(layer):
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


def _units(layer, axis):
    for attribute in ("units", "filters"):
        value = getattr(layer, attribute, None)
        if isinstance(value, int):
            return value
    try:
        return int(layer.output.shape[axis])
    except (AttributeError, ValueError, TypeError):
        return None


class _Buffers:
    """Ring buffers of `capacity` recorded steps, created under a strategy scope."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.variables = {}

    def add(self, key, shape, aggregation, dtype=tf.float32, initial=0.0):
        self.variables[key] = tf.Variable(
            tf.fill(shape, tf.constant(initial, dtype)),
            trainable=False,
            name="keras_vg_" + key.replace("/", "_"),
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=aggregation,
        )

    def __getitem__(self, key):
        return self.variables[key]


def _write_row(variable, value, slot):
    """Writes `value` into row `slot` of a ring buffer."""
    value = tf.convert_to_tensor(value, variable.dtype)
    # SyncOnRead variables have no scatter in a replica context: rewrite the (small) buffer.
    variable.assign(tf.tensor_scatter_nd_update(variable.read_value(), tf.reshape(slot, [1, 1]), value[tf.newaxis]))


def _close_window(accumulator, rows, slot):
    """Moves a since-last-record accumulator into row `slot` and restarts it."""
    _write_row(rows, accumulator.read_value(), slot)
    accumulator.assign(tf.zeros_like(accumulator))


def _on_record_steps(is_record, record):
    """Runs `record` (which only writes buffers) on record steps; other steps skip its work."""
    def skip():
        return tf.constant(False)

    def run():
        record()
        return tf.constant(True)

    return _keras_compat.unlowered_cond(is_record, run, skip)


class _StepContext(threading.local):
    """The train step being built, per thread: MirroredStrategy runs each replica's step in a thread of its own.

    `depth` is non-zero inside `train_step`; `activations` collects what the
    layer calls measured, for `apply` to take.
    """

    def __init__(self):
        self.depth = 0
        self.activations = []


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


class Tap:
    """Records per-variable and per-layer statistics inside the train step.

    Args:
        model: A built Keras model, compiled with an optimizer.
        every: Record every `every`-th optimizer step.
        capacity: Rows of the ring buffers: at least the number of recorded
            steps between two host reads.
        stats_to_record: Names from `keras_vg.format.STATS`.
        saturation_epsilon: Distance to an asymptote that counts as saturated.

    Example:

    >>> tap = Tap(model, every=1, capacity=2, stats_to_record=STATS)  # doctest: +SKIP
    >>> tap.install(); model.fit(x, y); records = tap.read_new()       # doctest: +SKIP
    """

    def __init__(self, model, every, capacity, stats_to_record, saturation_epsilon=0.01):
        self.model = model
        self.every = int(every)
        self.capacity = int(capacity)
        self.stats_to_record = tuple(stats_to_record)
        self.saturation_epsilon = float(saturation_epsilon)
        self.optimizer = _keras_compat.applying_optimizer(model.optimizer)
        self.variables = list(model.trainable_variables)
        self.variable_names = [v.path for v in self.variables]
        self._index = {}
        for i, variable in enumerate(self.variables):
            self._index[id(variable)] = i
            self._index[id(backend_value(variable))] = i
        self.dead_layers, self.saturation_layers = self._find_activation_layers()
        # Where each dead-unit layer's units start in the one `fired` buffer.
        self._unit_offsets = np.cumsum([0] + [units for _, _, units in self.dead_layers]).tolist()
        self.trace_count = 0
        self._step_context = _StepContext()
        self._unreadable = set()
        self._undo = []
        self.last_read_step = -1

    # Set-up -----------------------------------------------------------------

    def _find_activation_layers(self):
        dead, saturation, unsized = [], [], []
        want_dead = "dead_fraction" in self.stats_to_record
        want_saturation = "saturation_fraction" in self.stats_to_record
        for layer in walk_layers(self.model):
            name = activation_name(layer)
            if want_dead and name in RELU_FAMILY:
                axis = _unit_axis(layer)
                units = _units(layer, axis)
                if units is not None:
                    dead.append((layer, axis, units))
                else:
                    unsized.append(layer.name)
            elif want_saturation and name in SATURATING:
                saturation.append((layer, SATURATING[name]))
        if unsized:
            # Dead-unit buffers must exist before tracing; these layers' widths are only
            # known inside it (standalone activation layers of subclassed models).
            warnings.warn(
                f"GradientMonitor cannot size the dead-unit buffers of {unsized}, whose width is "
                "unknown before training (standalone activation layers in a subclassed model); "
                "their dead_fraction is not recorded. Use `activation=` on the layer before them "
                "to have it recorded.",
                stacklevel=4,
            )
        return dead, saturation

    @property
    def dead_layer_names(self):
        return [layer.name for layer, _, _ in self.dead_layers]

    @property
    def saturation_layer_names(self):
        return [layer.name for layer, _ in self.saturation_layers]

    def _create_buffers(self):
        capacity, n = self.capacity, len(self.variables)
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        total = tf.VariableAggregation.SUM
        buffers = _Buffers(capacity)
        buffers.add("steps", [capacity], first, tf.int64, -1)
        for name in ("grad_norm", "grad_max_abs", "grad_nonfinite", "weight_norm", "update_ratio"):
            buffers.add(name, [capacity, n], first)
        buffers.add("grad_nonfinite/acc", [n], first)
        buffers.add("global_grad_norm", [capacity], first)
        # One buffer for all layers: fewer ops per step and one host read.
        if self.dead_layers:
            buffers.add("fired", [capacity, self._unit_offsets[-1]], total)
            buffers.add("fired/acc", [self._unit_offsets[-1]], total)
        if self.saturation_layers:
            buffers.add("saturated", [capacity, len(self.saturation_layers), 2], total)
        return buffers

    def install(self):
        """Creates the buffers and wraps the optimizer, the train step and activation layers.

        The caller must rebuild the train function afterwards
        (`model.make_train_function(force=True)`), as a function traced
        before the wrapping does not see it.
        """
        with self.model.distribute_strategy.scope():
            self.buffers = self._create_buffers()
            distributed = tf.distribute.has_strategy()
        if any(s in self.stats_to_record for s in fmt.WEIGHT_STATS):
            self._update_meter = UpdateMeter(self.optimizer, self.variables, self._position, distributed)
        self._wrap_instance_method(self.optimizer, "apply", self._apply)
        self._wrap_instance_method(self.model, "train_step", self._train_step)
        for i, (layer, axis, _) in enumerate(self.dead_layers):
            # Marks are taken at once (a small vector); the window is added to in `apply`.
            measure = functools.partial(stats.fired_units, unit_axis=axis)
            self._wrap_instance_method(layer, "call", self._activation_call("fired", i, measure))
        for i, (layer, _) in enumerate(self.saturation_layers):
            # Counted in the record-step branch of `apply`: a branch per layer here
            # costs more than the count it skips.
            self._wrap_instance_method(layer, "call", self._activation_call("saturated", i, lambda outputs: outputs))
        # Where gradient statistics are taken: in `apply` on one replica (before any
        # Keras clipping); under a strategy, from the replica-summed gradient, through the
        # private hook or, where it is unavailable, an all-reduce of our own.
        self._gradients_in_apply = any(s in self.stats_to_record for s in fmt.GRADIENT_STATS)
        self._all_reduce_in_apply = False
        if self._gradients_in_apply and self.model.distribute_strategy.num_replicas_in_sync > 1:
            stages = _keras_compat.aggregated_gradient_stages(self.optimizer)
            if stages is not None:
                self._undo.append(stages.add(self._observe_aggregated, _keras_compat.PRE_CLIP))
                self._gradients_in_apply = False
            else:
                self._all_reduce_in_apply = True

    def _wrap_instance_method(self, obj, attribute, make_wrapper):
        original = getattr(obj, attribute)
        wrapper = make_wrapper(original)
        setattr(obj, attribute, wrapper)

        def undo():
            if obj.__dict__.get(attribute) is wrapper:
                delattr(obj, attribute)

        self._undo.append(undo)

    def uninstall(self):
        """Restores every wrapped method. Idempotent."""
        while self._undo:
            self._undo.pop()()

    # In-graph recording -------------------------------------------------------

    def _step(self):
        """The step being taken (`iterations` before the update) and whether it is recorded."""
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        return step, tf.equal(step % self.every, 0)

    def _on_record_steps(self, record, is_record=None):
        # With every=1 each step records: a tf.cond would be pure overhead.
        if self.every == 1:
            record()
        else:
            _on_record_steps(self._step()[1] if is_record is None else is_record, record)

    def _slot(self, step):
        return (step // self.every) % self.capacity

    def _train_step(self, original):
        def train_step(*args, **kwargs):
            # Layer calls outside the train step (evaluate, predict) must not
            # count towards the training window.
            context = self._step_context
            if not context.depth:
                context.activations = []  # left over only by a trace that failed
            context.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                context.depth -= 1

        return train_step

    def _activation_call(self, name, index, measure):
        """Wraps a layer's `call` to leave `measure(outputs)` of a training call for `apply`."""
        def make(original):
            def call(*args, **kwargs):
                outputs = original(*args, **kwargs)
                if self._step_context.depth and isinstance(outputs, tf.Tensor):
                    with tf.name_scope("keras_vg"):
                        self._step_context.activations.append((name, index, measure(outputs)))
                return outputs

            return call

        return make

    def _take_activations(self):
        """Takes the activation measurements the step's layer calls left, as `(fired, saturated)`.

        Layer calls come before `apply` in the same graph, so their tensors can
        be used there; those of a layer the model calls inside control flow of
        its own (a `tf.while_loop`) cannot, and are left out with a warning.

        Returns:
            Two lists of `(layer index, tensor)`: fired-unit marks, and
            outputs to count saturation in.
        """
        context = self._step_context
        pending, context.activations = context.activations, []
        fired, saturated = [], []
        for name, index, tensor in pending:
            if _usable_here(tensor):
                (fired if name == "fired" else saturated).append((index, tensor))
            elif (name, index) not in self._unreadable:
                self._unreadable.add((name, index))
                layers = self.dead_layers if name == "fired" else self.saturation_layers
                statistic = "dead_fraction" if name == "fired" else "saturation_fraction"
                warnings.warn(
                    f"GradientMonitor's {statistic} of layer {layers[index][0].name!r} leaves out the calls "
                    "the model makes inside control flow of its own (a tf.while_loop or tf.cond): their "
                    "activations cannot be read where the optimizer step is built.",
                    stacklevel=2,
                )
        return fired, saturated

    def _accumulate_fired(self, fired):
        """Adds the step's fired-unit marks of all layers to the window, in one write."""
        if not self.dead_layers:
            return
        by_layer = {}
        for index, marks in fired:  # a layer called twice marks what fired in either call
            by_layer[index] = by_layer[index] + marks if index in by_layer else marks
        if by_layer:
            self.buffers["fired/acc"].assign_add(tf.concat(
                [by_layer.get(i, tf.zeros([units])) for i, (_, _, units) in enumerate(self.dead_layers)], axis=0))

    def _count_saturated(self, saturated, slot):
        """Writes the saturation counts of the step's activations, all layers, to row `slot`."""
        counts = [tf.zeros([2])] * len(self.saturation_layers)
        for index, outputs in saturated:
            kind = self.saturation_layers[index][1]
            counts[index] = counts[index] + tf.stack(stats.saturated_count(outputs, kind, self.saturation_epsilon))
        _write_row(self.buffers["saturated"], tf.stack(counts), slot)

    def _position(self, variable):
        return self._index.get(id(variable), self._index.get(id(backend_value(variable))))

    def _positions(self, variables):
        return [self._position(v) for v in variables]

    def _observe_gradients(self, grads, variables):
        """Records statistics of the aggregated, unscaled, pre-clip gradients.

        With `grad_nonfinite` recorded, every step pays one fused reduction
        per variable, for the non-finite count that must not miss a step;
        norms and maxima are computed on record steps only, and only when
        recorded.
        """
        present = [(g, p) for g, p in zip(grads, self._positions(variables)) if g is not None and p is not None]
        if not present:
            return
        tensors = [stats.dense_values(g) for g, _ in present]
        positions = tf.constant([[p] for _, p in present], tf.int32)
        n = len(self.variables)
        step, is_record = self._step()
        wanted = set(self.stats_to_record)
        accumulator = self.buffers["grad_nonfinite/acc"]

        def sums_and_nonfinite():
            sums = stats.squared_norms(tensors)
            return sums, stats.nonfinite_counts(tensors, sums)

        counted = sums_and_nonfinite() if "grad_nonfinite" in wanted else None
        if counted is not None:
            accumulator.assign_add(tf.scatter_nd(positions, counted[1], [n]))

        def record():
            slot = self._slot(step)
            if wanted & {"grad_norm", "grad_max_abs", "global_grad_norm"}:
                sums, nonfinite = counted if counted is not None else sums_and_nonfinite()
                norms, max_abs = stats.norms_and_max_abs(tensors, sums, nonfinite)
                for name, row in (("grad_norm", norms), ("grad_max_abs", max_abs)):
                    if name in wanted:
                        _write_row(self.buffers[name], tf.scatter_nd(positions, row, [n]), slot)
                if "global_grad_norm" in wanted:
                    _write_row(self.buffers["global_grad_norm"], stats.global_norm(norms), slot)
            if counted is not None:
                _close_window(accumulator, self.buffers["grad_nonfinite"], slot)

        self._on_record_steps(record, is_record)

    def _observe_aggregated(self, grads, variables):
        with tf.name_scope("keras_vg"):
            self._observe_gradients(grads, variables)

    def _apply(self, original):
        def apply(grads, trainable_variables=None):
            self.trace_count += 1
            variables = list(trainable_variables) if trainable_variables is not None else self.variables
            grads = list(grads)
            with tf.name_scope("keras_vg"):
                step, is_record = self._step()
                fired, saturated = self._take_activations()
                self._accumulate_fired(fired)
                if self._gradients_in_apply:
                    self._observe_local_gradients(grads, variables)

            def apply_and_record(on_record_step_only):
                updated = [v for g, v in zip(grads, variables) if g is not None]
                measure = self._update_meter.around(updated, lambda: original(grads, trainable_variables))
                with tf.name_scope("keras_vg"):
                    on_record_step_only(lambda: self._record_update(measure(), step))
                return tf.constant(True)

            def apply_only():
                original(grads, trainable_variables)
                return tf.constant(False)

            if not any(s in self.stats_to_record for s in fmt.WEIGHT_STATS):
                original(grads, trainable_variables)
            elif self.every > 1 and self._can_branch_around_apply():
                # Only record steps copy the weights for the update ratio.
                _keras_compat.unlowered_cond(is_record, lambda: apply_and_record(lambda record: record()), apply_only)
            else:
                apply_and_record(lambda record: self._on_record_steps(record, is_record))
            with tf.name_scope("keras_vg"):
                self._on_record_steps(lambda: self._close_windows(step, saturated), is_record)

        return apply

    def _can_branch_around_apply(self):
        # Under a strategy the update calls merge_call, which a tf.cond branch
        # must not contain (keras-team/keras#20582); an unbuilt optimizer
        # creates variables in apply, which a branch must not either. Under XLA
        # a conditional that updates every variable makes XLA copy them all, which
        # costs more than the norms it skips (docs/PERFORMANCE.md).
        return (tf.distribute.get_replica_context().num_replicas_in_sync == 1 and self.optimizer.built
                and not getattr(self.model, "jit_compile", False))

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
        self._observe_gradients(grads, variables)

    def _record_update(self, measured, step):
        """On a record step: the weight norm before, and the ratio of the change actually applied."""
        if measured is None:
            return
        positions, weight_norms, ratios = measured
        positions = tf.constant([[p] for p in positions], tf.int32)
        n, slot = len(self.variables), self._slot(step)
        _write_row(self.buffers["weight_norm"], tf.scatter_nd(positions, weight_norms, [n]), slot)
        # Variables with no update this step read NaN (undefined), not 0.
        ratio_row = tf.tensor_scatter_nd_update(tf.fill([n], float("nan")), positions, ratios)
        _write_row(self.buffers["update_ratio"], ratio_row, slot)

    def _close_windows(self, step, saturated):
        slot = self._slot(step)
        if self.dead_layers:
            _close_window(self.buffers["fired/acc"], self.buffers["fired"], slot)
        if self.saturation_layers:
            self._count_saturated(saturated, slot)
        _write_row(self.buffers["steps"], step, slot)

    # Host side -----------------------------------------------------------------

    def read_new(self):
        """Reads the buffers once and returns the records not read before.

        Returns:
            A list of `(step, values)` sorted by step, `values` a dict from
            statistic name to a numpy vector (or float for
            `global_grad_norm`).
        """
        # Plain reads, not a tf.function: once per batch of records, and a SyncOnRead
        # variable read from the host is aggregated over replicas as it should be.
        arrays = {
            key: variable.numpy() for key, variable in self.buffers.variables.items() if not key.endswith("/acc")
        }
        records = []
        for row in np.argsort(arrays["steps"]):
            step = int(arrays["steps"][row])
            if step < 0 or step <= self.last_read_step:
                continue
            records.append((step, self._row_values(arrays, row)))
        if records:
            self.last_read_step = records[-1][0]
        return records

    def _row_values(self, arrays, row):
        values = {}
        for name in ("grad_norm", "grad_max_abs", "grad_nonfinite", "weight_norm", "update_ratio"):
            if name in self.stats_to_record:
                values[name] = arrays[name][row]
        if "global_grad_norm" in self.stats_to_record:
            values["global_grad_norm"] = float(arrays["global_grad_norm"][row])
        if self.dead_layers:
            never_fired = arrays["fired"][row] == 0
            values["dead_fraction"] = np.array(
                [np.mean(never_fired[start:end]) for start, end in zip(self._unit_offsets, self._unit_offsets[1:])],
                dtype=np.float32,
            )
        if self.saturation_layers:
            counts = arrays["saturated"][row]
            with np.errstate(invalid="ignore", divide="ignore"):
                values["saturation_fraction"] = np.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], np.nan)
        return values

    def names_for(self, name):
        """Returns the names a statistic's vector runs along (variable paths or layer names)."""
        axis = fmt.axis_of(name)
        if axis == fmt.AXIS_VARIABLE:
            return self.variable_names
        if name == "dead_fraction":
            return self.dead_layer_names
        if name == "saturation_fraction":
            return self.saturation_layer_names
        return None
