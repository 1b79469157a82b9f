"""The one module of keras-vg that touches private Keras or TensorFlow APIs.

Tested with Keras 3.15.1 on TensorFlow 2.21.0 (CPU). On other Keras versions it
warns once and falls back to public APIs only: the numbers stay right, and what
needs the private hook costs more (an extra all-reduce under a strategy).

Private names used here, and why:
- `TFOptimizer._all_reduce_sum_gradients`: the one place where, under
  `tf.distribute`, the gradient the optimizer will apply exists summed over
  replicas. Hooking it gives exact per-variable statistics with no extra
  communication.
- `BaseOptimizer._use_weight_decay`: whether Keras decays a variable outside
  the optimizer's `assign*` methods (see `update_is_observable`).
- The `_lower_using_switch_merge` attribute of TensorFlow's `If` op (see
  `unlowered_cond`).
- That the TensorFlow trainer's `make_train_function` binds `train_step` when
  it builds the function, not when it traces it (see
  `train_function_with_step`).
"""

import collections
import contextlib
import warnings

import keras
import numpy as np

TESTED_KERAS_VERSIONS = ("3.15",)
"""`major.minor` of the Keras releases whose private APIs were checked."""

_warned_untested = False


def keras_version_is_tested():
    """Returns True when the installed Keras is one this module was tested with."""
    return any(keras.__version__.startswith(v + ".") or keras.__version__ == v for v in TESTED_KERAS_VERSIONS)


def _warn_untested_once():
    global _warned_untested
    if not _warned_untested:
        _warned_untested = True
        warnings.warn(
            f"keras-vg was tested with Keras {', '.join(TESTED_KERAS_VERSIONS)}.x; "
            f"Keras {keras.__version__} is installed. keras-vg falls back to public "
            "APIs only: statistics stay exact, but under tf.distribute they cost "
            "an extra all-reduce of the gradients.",
            stacklevel=3,
        )


def applying_optimizer(optimizer):
    """Returns the optimizer that actually applies updates, unwrapping loss scaling.

    `LossScaleOptimizer` calls its inner optimizer with gradients already
    divided by the loss scale, and only on steps whose gradients are finite;
    the inner optimizer's `iterations` is the step counter (public attribute
    `inner_optimizer`).
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    return applying_optimizer(inner) if inner is not None else optimizer


def train_function_with_step(model, train_step):
    """Builds a train function the way `model.make_train_function` does, around another step.

    The function has everything Keras puts around its step (the loop of
    `steps_per_execution`, the distribution strategy, `jit_compile`), so it
    can stand in for `model.train_function` on some steps. The model's own
    `train_function` and `train_step` are left as they were: Keras 3.15's
    TensorFlow trainer reads `train_step` when it builds the function.

    Args:
        model: A compiled Keras model on the TensorFlow backend.
        train_step: A function of one batch, as `Model.train_step`.

    Returns:
        The new train function (traced at its first call).
    """
    own_step = model.__dict__.get("train_step")
    own_function = model.train_function
    model.train_step = train_step
    try:
        model.make_train_function(force=True)
        return model.train_function
    finally:
        if own_step is None:
            del model.train_step
        else:
            model.train_step = own_step
        model.train_function = own_function


def unlowered_cond(pred, true_fn, false_fn):
    """`tf.cond` whose branch not taken costs nothing.

    Outside XLA, TensorFlow lowers a `tf.cond` into Switch and Merge nodes,
    and every node of the branch not taken is still visited, as dead, on
    every step. Keeping the `If` op functional runs only the branch taken, for
    about the price of a small lowered cond: record-step work then costs
    nothing on the other steps (docs/PERFORMANCE.md). Under XLA the
    attribute is ignored. Not for a branch that touches variables of several
    devices (a cross-replica update under MirroredStrategy): a functional
    `If` cannot be placed across devices.

    Args:
        pred: A scalar boolean tensor.
        true_fn: A function of no arguments returning the true branch's outputs.
        false_fn: The same for the false branch.

    Returns:
        The outputs of the branch taken.
    """
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2

    if tf.executing_eagerly():
        return true_fn() if bool(pred) else false_fn()
    graph = tf.compat.v1.get_default_graph()
    first_new = len(graph.get_operations())
    outputs = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[first_new:]:
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return outputs


# Built-in optimizers whose `update_step` changes each variable through exactly one
# call of the public `assign`, `assign_add` or `assign_sub` (checked for Keras 3.15
# by tests/test_weight_updates.py against weights copied around the step).
_OBSERVABLE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Nadam", "Adamax", "Adagrad", "Adadelta", "RMSprop",
                          "Lion", "Lamb", "Adafactor", "Ftrl")


def update_is_observable(optimizer, variable):
    """Says whether every change the optimizer makes to a variable goes through one `assign*` call.

    True only for the built-in optimizers listed above, on a tested Keras
    version, and only for a variable that Keras changes nowhere else in the
    step: no weight decay (applied with the variable's own `assign_sub`), no
    constraint, no overwrite with its gradient, and no EMA overwrite.

    Args:
        optimizer: The optimizer that applies the updates (see
            `applying_optimizer`).
        variable: A Keras variable it trains.

    Returns:
        A bool.
    """
    if not _writes_through_assign(optimizer):
        return False
    if getattr(optimizer, "use_ema", False) and getattr(optimizer, "ema_overwrite_frequency", None):
        return False
    if getattr(variable, "constraint", None) is not None or getattr(variable, "overwrite_with_gradient", False):
        return False
    return optimizer.weight_decay is None or not optimizer._use_weight_decay(variable)


def _writes_through_assign(optimizer):
    """Whether the optimizer's `update_step` writes every variable through its public `assign*`."""
    return keras_version_is_tested() and any(
        type(optimizer) is getattr(keras.optimizers, name) for name in _OBSERVABLE_OPTIMIZERS)


PRE_CLIP = 0
"""Stage order of an observer that must see the gradient before any clipping."""
CLIP = 10
"""Stage order of a transform that clips the gradient."""
POST_CLIP = 20
"""Stage order of an observer of the gradient as it will be applied."""


class AggregatedGradientStages:
    """Ordered stages run on the replica-summed gradients of one optimizer.

    One wrapper of `_all_reduce_sum_gradients` per optimizer runs every
    registered stage in `order`, whatever order the callbacks that registered
    them were created in: a monitor at `PRE_CLIP` sees what a clipping policy
    at `CLIP` receives.
    """

    def __init__(self, optimizer, original):
        self.optimizer = optimizer
        self.original = original
        self._stages = []  # (order, serial, stage)
        self._serial = 0
        self.hook = self._run  # one bound method, so that removal can recognise it

    def add(self, stage, order):
        """Registers `stage(grads, variables)`, which returns new grads or None (unchanged).

        Returns:
            A function that removes the stage (and the wrapper with the last one).
        """
        self._serial += 1
        entry = (order, self._serial, stage)
        self._stages.append(entry)
        self._stages.sort(key=lambda e: e[:2])

        def remove():
            if entry in self._stages:
                self._stages.remove(entry)
            if not self._stages and self.optimizer.__dict__.get("_all_reduce_sum_gradients") is self.hook:
                del self.optimizer._all_reduce_sum_gradients
                del self.optimizer._keras_vg_stages

        return remove

    def _run(self, grads_and_vars):
        pairs = list(self.original(grads_and_vars))
        grads, variables = [g for g, _ in pairs], [v for _, v in pairs]
        for _, _, stage in list(self._stages):
            changed = stage(grads, variables)
            if changed is not None:
                grads = list(changed)
        return list(zip(grads, variables))


def aggregated_gradient_stages(optimizer):
    """Returns the `AggregatedGradientStages` of an optimizer, installing its hook once.

    Args:
        optimizer: A Keras TensorFlow-backend optimizer (already unwrapped,
            see `applying_optimizer`).

    Returns:
        The stages object, or None when the hook cannot be installed on this
        Keras version (the caller must then fall back to public APIs).
    """
    stages = optimizer.__dict__.get("_keras_vg_stages")
    if stages is not None:
        return stages
    if not keras_version_is_tested():
        _warn_untested_once()
        return None
    original = getattr(optimizer, "_all_reduce_sum_gradients", None)
    if original is None:
        return None
    stages = AggregatedGradientStages(optimizer, original)
    optimizer._keras_vg_stages = stages
    optimizer._all_reduce_sum_gradients = stages.hook
    return stages


# Auto-clipping (keras_vg.clipping) ---------------------------------------------
#
# Tested with Keras 3.15.1 / TensorFlow 2.21.0, single device, MirroredStrategy
# over two logical CPUs, XLA and LossScaleOptimizer. Private names used, and why:
# - `TFOptimizer._backend_update_step`, `_distributed_tf_update_step`,
#   `_distribution_strategy`: the update has to be made conditional where the
#   replica-summed gradient exists, which is inside `_backend_update_step`, and
#   in a cross-replica context (a `tf.cond` around anything that calls
#   `merge_call` fails in a replica context, keras-team/keras#20582).
# - `BaseOptimizer._apply_weight_decay`, `_use_weight_decay`: Keras decays the
#   weights before `_backend_update_step`; a skipped step must not decay them,
#   so the decay moves into the conditional update.
# - The Keras saving walk (`keras.src.saving.saving_lib._walk_saveable`)
#   visits every attribute of a model that is a Keras saveable: a `Layer`
#   attached outside the layer tracker is saved with the weights and restored
#   by `load_weights`, without appearing in `model.layers` or `model.weights`.


UpdatePlan = collections.namedtuple("UpdatePlan", ["apply", "transform_if", "transform"])
UpdatePlan.__doc__ = """What `install_update_guard`'s `should_apply` may return instead of a flag.

One replica and no masked writes only.

Attributes:
    apply: Scalar bool tensor: False leaves every variable and slot as it was.
    transform_if: Scalar bool tensor: where True (and `apply`), the update
        applies `transform(grads)` instead of the gradients.
    transform: A function from the list of gradients to the list to apply,
        traced inside that branch only.
"""


def install_update_guard(optimizer, should_apply, masked=False):
    """Makes an optimizer's variable updates conditional on an in-graph flag.

    After the hook, `_backend_update_step` all-reduces the gradients (running
    the `aggregated_gradient_stages`), then calls `should_apply()` in the same
    replica context; where it returns a boolean tensor, the weight decay and the
    update of every variable and optimizer slot run only when it is True on
    every replica. `iterations` is not touched here: Keras increments it after
    `_backend_update_step`, whatever happened inside.

    The update runs inside a `tf.cond`, except with `masked=True` for a
    built-in optimizer on one replica: then every write the update makes
    selects the variable's old value where the flag is False. Under XLA a
    conditional that writes every variable makes XLA copy them all on every
    step; a select fuses into the write.

    On one replica without masks, `should_apply` may return an `UpdatePlan`:
    the same conditional then also chooses between the gradients and a
    transform of them (clipping). Measured on an SGD MLP (docs/PERFORMANCE.md),
    each lowered conditional that takes the gradients costs a few percent of
    the step, so the clip shares the skip's conditional rather than adding
    its own.

    Args:
        optimizer: A Keras TensorFlow-backend optimizer, already unwrapped
            (see `applying_optimizer`).
        should_apply: A function of no arguments, called once per trace in
            the replica context, returning a scalar boolean tensor, an
            `UpdatePlan`, or None (update unconditionally).
        masked: Prefer masked writes to a branch (for XLA).

    Returns:
        A function that removes the hook, or None when this Keras version
        has no such hook (the caller must then do without skipping).
    """
    if not keras_version_is_tested():
        _warn_untested_once()
        return None
    needed = ("_backend_update_step", "_distributed_tf_update_step", "_all_reduce_sum_gradients",
              "_apply_weight_decay", "_use_weight_decay", "_distribution_strategy")
    if not all(hasattr(optimizer, name) for name in needed):
        return None
    import tensorflow as tf

    def decay(distribution, variables, apply=None):
        # Keras's own decay (TFOptimizer._apply_weight_decay), callable from a cross-replica context.
        if optimizer.weight_decay is None:
            return

        def weight_decay_fn(variable):
            if optimizer._use_weight_decay(variable):
                lr = tf.cast(optimizer.learning_rate, variable.dtype)
                wd = tf.cast(optimizer.weight_decay, variable.dtype)
                variable.assign_sub(_where(apply, variable * wd * lr, 0.0))

        for variable in variables:
            distribution.extended.update(variable, weight_decay_fn, group=False)

    def guarded_update(distribution, grads_and_vars, learning_rate, flag, variables):
        def update(apply=None, pairs=grads_and_vars):
            decay(distribution, variables, apply)
            optimizer._distributed_tf_update_step(distribution, pairs, learning_rate)
            return tf.constant(True)

        def planned(plan):
            # The update is traced once (GradientMonitor's update meter counts one write per variable);
            # the gradients it applies are chosen inside the branch that runs it.
            grads = [g for g, _ in grads_and_vars]
            chosen = tf.cond(plan.transform_if, lambda: plan.transform(grads), lambda: list(grads))
            return update(pairs=list(zip(chosen, [v for _, v in grads_and_vars])))

        if flag is None:
            update()
            return
        if isinstance(flag, UpdatePlan):
            if masked or distribution.num_replicas_in_sync != 1:
                raise ValueError("An UpdatePlan needs one replica and no masked writes. "
                                 f"Received: masked={masked}, replicas={distribution.num_replicas_in_sync}")
            tf.cond(flag.apply, lambda: planned(flag), lambda: tf.constant(False))
            return
        # Every replica decided on the same summed gradient; all() is there for safety.
        apply = tf.reduce_all(tf.stack(distribution.experimental_local_results(flag)))
        if masked and distribution.num_replicas_in_sync == 1 and _writes_through_assign(optimizer):
            with _masked_writes(optimizer, apply):
                update(apply)
        else:
            tf.cond(apply, update, lambda: tf.constant(False))

    def backend_update_step(grads, trainable_variables, learning_rate):
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        grads_and_vars = optimizer._all_reduce_sum_gradients(list(zip(grads, variables)))
        flag = should_apply()
        tf.__internal__.distribute.interim.maybe_merge_call(
            guarded_update, optimizer._distribution_strategy, grads_and_vars, learning_rate, flag, variables
        )

    def no_decay(variables):
        del variables  # applied inside the guarded update instead

    optimizer._backend_update_step = backend_update_step
    optimizer._apply_weight_decay = no_decay

    def remove():
        for name, hook in (("_backend_update_step", backend_update_step), ("_apply_weight_decay", no_decay)):
            if optimizer.__dict__.get(name) is hook:
                delattr(optimizer, name)

    return remove


def _where(apply, value, otherwise):
    """`value` where `apply` is True (or None), else `otherwise`; sparse values keep their indices."""
    import tensorflow as tf

    if apply is None:
        return value
    if isinstance(value, tf.IndexedSlices):
        return tf.IndexedSlices(_where(apply, value.values, otherwise), value.indices, value.dense_shape)
    value = tf.convert_to_tensor(value)
    return tf.where(apply, value, tf.cast(otherwise, value.dtype))


def _masked_writes(optimizer, apply):
    """A context in which the optimizer's `assign*` calls leave their variable unchanged where `apply` is False.

    Bit for bit: x + (−0.0) and x − (+0.0) are x for every x, −0.0 included.
    """
    import tensorflow as tf

    def masked(method, original):
        def write(variable, value):
            if method == "assign_add":
                value = _where(apply, value, -0.0)
            elif method == "assign_sub":
                value = _where(apply, value, 0.0)
            else:
                current = tf.convert_to_tensor(variable.value if isinstance(variable, keras.Variable) else variable)
                if isinstance(value, tf.IndexedSlices):
                    current = tf.gather(current, value.indices)
                value = _where(apply, value, current)
            return original(variable, value)

        return write

    return wrapped_assign_methods(optimizer, masked)


_ASSIGN_METHODS = ("assign", "assign_add", "assign_sub")


@contextlib.contextmanager
def wrapped_assign_methods(optimizer, wrap):
    """Replaces the optimizer instance's `assign*` methods while the block runs (a trace).

    Args:
        optimizer: A Keras optimizer.
        wrap: A function `(method_name, original) -> replacement`.
    """
    own = {name: optimizer.__dict__[name] for name in _ASSIGN_METHODS if name in optimizer.__dict__}
    for name in _ASSIGN_METHODS:
        setattr(optimizer, name, wrap(name, getattr(optimizer, name)))
    try:
        yield
    finally:
        for name in _ASSIGN_METHODS:
            if name in own:
                setattr(optimizer, name, own[name])
            else:
                delattr(optimizer, name)


def attach_saved_state(model, name, saveable):
    """Attaches a Keras saveable to a model so that its variables are checkpointed with it.

    `model.save_weights` / `model.save` (and so `BackupAndRestore` and
    `ModelCheckpoint`) then save `saveable.save_own_variables`, and
    `model.load_weights` restores them, while `model.layers`,
    `model.weights` and `model.summary()` are unchanged (the layer tracker is
    bypassed). A file saved without the state loads as before, and so does a
    file with the state into a model without it.

    Args:
        model: A Keras model.
        name: The attribute name, also the path of the state in the file.
        saveable: A `keras.layers.Layer` implementing `save_own_variables`
            and `load_own_variables`.
    """
    object.__setattr__(model, name, saveable)


# Keras's JAX backend (keras_vg.jax_tap) -----------------------------------------
#
# Tested with Keras 3.15.1 on JAX 0.10.2 (CPU). Private names used, and why:
# - `Trainer._jax_state` and `_jax_state_synced`: during `fit`, Keras's JAX trainer
#   holds the variables' values in that state and writes them back only at the end
#   of an epoch; what the monitor reads in between (its records, the optimizer's
#   step count, the loss tracker) is read from there.
# - `Layer._metrics`: the list a model's metrics are tracked in, to replace the
#   records metric of an earlier compile rather than keep both; `Layer._tracker`
#   (`locked`, `lock`, `unlock`): a built subclassed model locks its tracker against
#   new state, which the records metric is.
# - `Optimizer._trainable_variables`: the variables `stateless_apply` takes the values of,
#   in its order (AutoClip on JAX maps them to those values to read its policies' weights).


TESTED_JAX_VERSIONS = ("0.10",)
"""`major.minor` of the JAX releases the JAX tap was tested with."""

_warned_jax = False


def warn_if_jax_untested():
    """Warns once when the installed JAX is not one `keras_vg.jax_tap` was tested with."""
    global _warned_jax
    import jax

    if _warned_jax or any(jax.__version__ == v or jax.__version__.startswith(v + ".") for v in TESTED_JAX_VERSIONS):
        return
    _warned_jax = True
    warnings.warn(f"keras-vg's JAX tap was tested with JAX {', '.join(TESTED_JAX_VERSIONS)}.x; JAX "
                  f"{jax.__version__} is installed. It records through Keras's public stateless API, so the "
                  "numbers should hold; if training fails, remove GradientMonitor and report it.", stacklevel=3)


def optimizer_trainable_variables(optimizer):
    """The variables an optimizer was built for, in the order `stateless_apply` takes their values."""
    return list(optimizer._trainable_variables)


def is_primary_process():
    """Whether this process writes the records: the only one, or JAX's process 0 of several."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return jax.process_index() == 0


def process_count():
    """How many processes train together: JAX's process count, else 1."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def attach_metric(model, name, metric):
    """Attaches a metric to a built model, whose variables Keras then threads through each step.

    A metric attached earlier under the same name is replaced.

    Args:
        model: A Keras model.
        name: The attribute name.
        metric: A `keras.metrics.Metric`.

    Returns:
        The metric.
    """
    previous = getattr(model, name, None)
    if previous is not None and previous in model._metrics:
        model._metrics.remove(previous)
    # A built layer's tracker is locked against new state; Keras unlocks it the same way to untrack.
    tracker = model._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        setattr(model, name, metric)  # Keras's attribute tracking adds it to model.metrics
    finally:
        if locked:
            tracker.lock()  # keeps the message it was locked with
    return metric


def _value_in_jax_state(model, variable):
    """A variable's value in Keras's JAX training state during `fit`, or None where the variable holds it."""
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True):
        return None
    groups = (("trainable_variables", model.trainable_variables),
              ("non_trainable_variables", model.non_trainable_variables),
              ("optimizer_variables", model.optimizer.variables),
              ("metrics_variables", model.metrics_variables))
    for key, variables in groups:
        values = state.get(key) or ()
        for candidate, value in zip(variables, values):
            if candidate is variable:
                return value
    return None


def current_value(model, variable):
    """The current value of a model's, its optimizer's or its metrics' variable, as a backend tensor.

    On the JAX backend during `fit`, the value is the one Keras's trainer
    holds in its state, which reaches the variable only at the end of the
    epoch. On TensorFlow, the backend variable itself.

    Args:
        model: The Keras model being trained.
        variable: One of its, its optimizer's or its metrics' variables.

    Returns:
        A `tf.Variable` or a JAX array.
    """
    value = _value_in_jax_state(model, variable)
    if value is not None:
        return value
    return variable.value if isinstance(variable, keras.Variable) else variable


def read_variable(model, variable):
    """`current_value`, as numpy.

    Args:
        model: The Keras model being trained.
        variable: One of its, its optimizer's or its metrics' variables.

    Returns:
        A numpy array.
    """
    value = _value_in_jax_state(model, variable)
    return np.asarray(variable.numpy() if value is None else value)
