"""Norms of the weights before an optimizer update, and of the change it makes.

The update ratio ‖Δw‖/‖w‖ needs Δw, the change the optimizer actually
applied. It is measured in one of two ways, chosen per variable:

- **Observed.** While the optimizer's update is traced, its public `assign`,
  `assign_add` and `assign_sub` methods are wrapped, and ‖Δw‖ is taken from
  the very tensor they add, subtract or store. There is no copy of the
  weights, which is most of what `every=1` used to cost (docs/PERFORMANCE.md).
  Where that tensor is a recorded gradient times a scalar (plain SGD's
  `g · lr`), ‖Δw‖ is |lr|·‖g‖ from the record, without a pass of its own.
- **Copied.** The weights are copied before the update and subtracted from
  the new values after it. Exact whatever changes the variable (weight
  decay, constraints, custom optimizers, `tf.distribute`), at the price of a
  copy and a subtraction per variable.

`_keras_compat.update_is_observable` says which variables can be observed;
under a distribution strategy every variable is copied.
"""

import contextlib
import warnings

import keras
import tensorflow as tf

from keras_vg import _keras_compat, stats


def backend_value(variable):
    """The backend variable of a Keras variable (a tf.Variable passes through)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _half_squared_norm(value):
    """‖value‖² / 2, in one fused op: the factor 2 is applied once to all variables' vector."""
    if isinstance(value, tf.IndexedSlices):
        # Rows given twice are added twice by the scatter: sum them before squaring.
        rows, row_of = tf.unique(value.indices)
        value = tf.math.unsorted_segment_sum(value.values, row_of, tf.shape(rows)[0])
    return tf.nn.l2_loss(tf.cast(value, tf.float32))


def _scaled_gradient(value, row_of):
    """`(scalar, row)` where `value` is the recorded gradient `row_of` names times a scalar, else None.

    Plain SGD subtracts `g · lr`: ‖Δw‖ is |lr|·‖g‖, and the record has
    already taken ‖g‖, so the update needs no pass of its own (one pass
    over every parameter, docs/PERFORMANCE.md); a learning rate of 0 reads 0.
    A sparse update (`IndexedSlices`) is not matched: it adds repeated rows.

    Args:
        value: What the optimizer adds to or subtracts from a variable.
        row_of: A dict from recorded gradient tensors' `ref()` to their rows.

    Returns:
        A pair `(scalar tensor, int)`, or None.
    """
    if (not row_of or not isinstance(value, tf.Tensor) or tf.executing_eagerly() or value.dtype != tf.float32
            or value.op.type != "Mul"):
        return None
    first, second = value.op.inputs
    for gradient, scalar in ((first, second), (second, first)):
        # Keras hands the gradients to `update_step` through an `IdentityN`.
        while gradient.op.type in ("Identity", "IdentityN"):
            gradient = gradient.op.inputs[gradient.value_index]
        row = row_of.get(gradient.ref())
        if row is not None and scalar.shape.rank == 0:
            return scalar, row
    return None


class UpdateMeter:
    """Measures ‖w‖ before and ‖Δw‖ of an optimizer's update, per variable.

    Args:
        optimizer: The optimizer that applies the updates (see
            `_keras_compat.applying_optimizer`).
        variables: The variables to measure, in record order.
        position_of: A function from a variable (Keras or backend) to its
            position in `variables`, or None for one not measured.
        distributed: Whether training runs under a distribution strategy;
            then every variable is copied.

    Example:

    >>> meter = UpdateMeter(optimizer, model.trainable_variables, position_of, distributed=False)  # doctest: +SKIP
    >>> finish = meter.around(variables, lambda: optimizer.apply(grads, variables))  # doctest: +SKIP
    >>> positions, weight_norms, ratios = finish()  # doctest: +SKIP
    """

    def __init__(self, optimizer, variables, position_of, distributed):
        self.optimizer = optimizer
        self.position_of = position_of
        self.observed = [not distributed and _keras_compat.update_is_observable(optimizer, v) for v in variables]
        self._names = [v.path for v in variables]
        self._warned = False
        self._half_change_squares = None
        if any(self.observed):
            # For updates inside a tf.cond branch (loss scaling, AutoClip's skip), from where
            # a tensor cannot be handed back out.
            self._half_change_squares = tf.Variable(tf.zeros([len(variables)]), trainable=False,
                                                    name="keras_vg_change_squares",
                                                    experimental_enable_variable_lifting=False)

    def around(self, variables, update, gradient_norms=None):
        """Runs `update()`, measuring the given variables around it.

        Args:
            variables: The variables `update` may change.
            update: A function of no arguments that applies the optimizer's
                update.
            gradient_norms: Optional pair `(norms, row_of)` of the gradients
                the step has recorded: their L2 norms as a float32 vector,
                and a dict from each gradient tensor's `ref()` to its row. An
                update that is one of them times a scalar (plain SGD's
                `g · lr`) takes its norm from there.

        Returns:
            A function of no arguments, called after the update (within a
            record-step branch if only those are recorded), that returns
            `(positions, weight_norms, ratios)`: the positions of the measured
            variables, ‖w‖ before the update and ‖Δw‖/‖w‖ as float32 vectors.
            A ratio is NaN where ‖w‖ = 0 or the change could not be observed.
        """
        present = [(v, p) for v in variables if (p := self.position_of(v)) is not None]
        observed = [(v, p) for v, p in present if self.observed[p]]
        copied = [(v, p) for v, p in present if not self.observed[p]]
        calls = {p: 0 for _, p in observed}
        # ‖Δw‖²/2 of the updates traced in this graph, by position; those traced inside a
        # branch are written to the variable at once (see `_observer`).
        half_squares = {}
        scaled = {}  # position -> (scalar, row of gradient_norms): updates that are a gradient times a scalar
        norms_of_gradients, row_of = gradient_norms or (None, {})
        weight_squares = None
        with tf.name_scope("keras_vg"):
            before = [tf.identity(backend_value(v)) for v, _ in copied]
            if observed:
                # A branch not taken must read as no change.
                self._half_change_squares.assign(tf.zeros_like(self._half_change_squares))
                weight_squares = stats.squared_norms([tf.cast(backend_value(v), tf.float32) for v, _ in observed])
        with self._observing(calls, weight_squares, half_squares, scaled, row_of):
            update()
        self._warn_unobserved([p for p, count in calls.items() if count != 1])
        indices = [p for _, p in observed]
        from_variable = not all(p in half_squares for p in indices if p not in scaled)
        if from_variable and half_squares:
            with tf.name_scope("keras_vg"):
                self._half_change_squares.scatter_nd_update(
                    [[p] for p in half_squares], tf.stack(list(half_squares.values())))

        def finish():
            norms, ratios, positions = [], [], []
            if observed:
                changes = self._observed_changes(indices, half_squares, from_variable, scaled, norms_of_gradients)
                weight_norms = tf.sqrt(weight_squares)
                ratio = stats.change_ratios(weight_norms, changes)
                unmeasured = tf.constant([calls[p] != 1 for p in indices])
                norms.append(weight_norms)
                ratios.append(tf.where(unmeasured, float("nan"), ratio))
                positions += indices
            if copied:
                after = [tf.identity(backend_value(v)) for v, _ in copied]
                weight_norms, ratio = stats.update_ratios(before, after)
                norms.append(weight_norms)
                ratios.append(ratio)
                positions += [p for _, p in copied]
            if not positions:
                return None
            return positions, tf.concat(norms, 0), tf.concat(ratios, 0)

        return finish

    def _observed_changes(self, indices, half_squares, from_variable, scaled, norms_of_gradients):
        """‖Δw‖ of the observed updates, in `indices` order: a few ops, however many variables."""
        parts, order = [], []
        measured = [p for p in indices if p not in scaled]
        if measured:
            if from_variable:
                halves = tf.gather(self._half_change_squares.read_value(), measured)
            else:
                halves = tf.stack([half_squares[p] for p in measured])
            parts.append(tf.sqrt(2.0 * halves))
            order += measured
        if scaled:
            from_gradient = [p for p in indices if p in scaled]
            scalars = tf.stack([scaled[p][0] for p in from_gradient])
            parts.append(tf.abs(scalars) * tf.gather(norms_of_gradients, [scaled[p][1] for p in from_gradient]))
            order += from_gradient
        changes = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
        return changes if order == indices else tf.gather(changes, [order.index(p) for p in indices])

    @contextlib.contextmanager
    def _observing(self, calls, weights_read, half_squares, scaled, row_of):
        """Wraps the optimizer's assign methods while `update` is traced."""
        if not calls:
            yield
            return
        graph = tf.compat.v1.get_default_graph()
        with _keras_compat.wrapped_assign_methods(
                self.optimizer,
                lambda name, original: self._observer(original, name, calls, weights_read, half_squares, graph,
                                                      scaled, row_of)):
            yield

    def _observer(self, original, method, calls, weights_read, half_squares, graph, scaled, row_of):
        def observe(variable, value):
            position = self.position_of(variable)
            if position not in calls:
                return original(variable, value)
            calls[position] += 1
            in_graph = tf.compat.v1.get_default_graph() is graph
            match = _scaled_gradient(value, row_of) if in_graph and method != "assign" else None
            if match is not None:
                scaled[position] = match
                with tf.control_dependencies([weights_read]):
                    return original(variable, value)
            with tf.name_scope("keras_vg"):
                half_square = self._half_change_square(variable, value, method)
                if half_square is not None and not in_graph:
                    self._half_change_squares.scatter_nd_update([[position]], tf.reshape(half_square, [1]))
                elif half_square is not None:
                    half_squares[position] = half_square
            if half_square is None:
                calls[position] += 1  # a sparse overwrite: left unmeasured
                return original(variable, value)
            # The write waits for the weights' norms, taken before: otherwise it would copy them;
            # an overwrite also waits for its change, which reads the old value.
            after = [weights_read, half_square] if method == "assign" else [weights_read]
            with tf.control_dependencies(after):
                return original(variable, value)

        return observe

    @staticmethod
    def _half_change_square(variable, value, method):
        """‖Δw‖²/2 of one assign call, or None for a sparse overwrite."""
        if method == "assign_add" or method == "assign_sub":
            return _half_squared_norm(value)
        if isinstance(value, tf.IndexedSlices):
            return None
        return _half_squared_norm(tf.cast(value, tf.float32) - tf.cast(backend_value(variable), tf.float32))

    def _warn_unobserved(self, positions):
        if positions and not self._warned:
            self._warned = True
            warnings.warn(
                f"keras-vg could not observe a single update of {[self._names[p] for p in positions]} "
                f"by {type(self.optimizer).__name__}; their update_ratio reads NaN.",
                stacklevel=2,
            )
