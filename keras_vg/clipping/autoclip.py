"""`AutoClip`: the callback that switches gradient clipping on when gradients explode."""

import math
import os
import sys
import threading
import time
import warnings
import weakref

import keras
import numpy as np

from keras_vg import _keras_compat
from keras_vg import format as fmt
from keras_vg.clipping._tf import tf
from keras_vg.clipping.agc import AGC
from keras_vg.clipping.global_norm import GlobalNorm
from keras_vg.clipping.guard import SpikeGuard
from keras_vg.clipping.percentile import Percentile
from keras_vg.clipping.policy import ClipPolicy, check_positive, scale_gradients
from keras_vg.clipping.switch import ClipSwitch
from keras_vg.clipping.zscore import ZScore
from keras_vg.run_log import RunLog

POLICIES = {"zscore": ZScore, "percentile": Percentile, "agc": AGC, "global_norm": GlobalNorm}
"""Policies by the names `AutoClip(policy=...)` accepts, each with its defaults."""

STATE_ATTRIBUTE = "_keras_vg_autoclip_state"
"""The model attribute holding the checkpointed state (also its path in weight files)."""

RECORD_COLUMNS = ("global_grad_norm",) + fmt.CLIP_STATS
"""The columns of a per-step record, in buffer order."""

EVENT_CODES = {1: "clip_on", 2: "clip_off", 3: "skip"}
EVENT_CAPACITY = 256
"""Events kept on the device between two host reads."""

RECORD_CAPACITY = 1024
"""Records kept on the device between two host reads (plus one execution's worth): a
GradientMonitor with a larger `every` than AutoClip's reads them less often than AutoClip
writes them."""

READ_BATCH_RECORDS = 32
READ_INTERVAL_SECS = 1.0

_installed = weakref.WeakKeyDictionary()  # optimizer -> the AutoClip whose hooks it carries


def _resolve(value, name):
    if isinstance(value, ClipPolicy):
        return value
    if isinstance(value, str) and value in POLICIES:
        return POLICIES[value]()
    raise ValueError(
        f"`{name}` must be one of {sorted(POLICIES)} or a keras_vg clipping policy "
        f"(GlobalNorm, Percentile, ZScore, AGC). Received: {name}={value!r}"
    )


def _config_key(policy):
    return (type(policy).__name__, tuple(sorted(policy.get_config().items()))) if policy is not None else None


class _ClipState(keras.layers.Layer):
    """The state saved with the model's weights: statistics, on/off, counts.

    Held in two variables (every float, every integer), not one per entry:
    a train step reads and writes each variable once, and on a small model
    each variable op is a visible part of the step (docs/PERFORMANCE.md).
    Weight files keep one entry per name.
    """

    def __init__(self, key, initial, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.key = key
        self.names = list(initial)
        self._shapes = {name: np.shape(value) for name, value in initial.items()}
        # Scalars first, each kind in name order: one unstack reads them all.
        from keras_vg.device_buffers import sync_on_read  # TensorFlow: only where AutoClip acts

        self._order = {
            kind: sorted((n for n in self.names if np.asarray(initial[n]).dtype == kind),
                         key=lambda n: (self._shapes[n] != (), n))
            for kind in (np.float32, np.int64)
        }
        self.packed = {
            kind: sync_on_read(self._pack_numpy(initial, kind), f"keras_vg_autoclip_{np.dtype(kind).name}")
            for kind in self._order
        }

    def _pack_numpy(self, values, kind):
        return np.concatenate([np.asarray(values[n], kind).reshape(-1) for n in self._order[kind]] or
                              [np.zeros([0], kind)])

    def numpy(self):
        """The state as a dict of numpy values."""
        values = {}
        for kind, names in self._order.items():
            flat, offset = self.packed[kind].numpy(), 0
            for name in names:
                size = int(np.prod(self._shapes[name]))
                values[name] = flat[offset: offset + size].reshape(self._shapes[name]).copy()
                offset += size
        return values

    def read(self):
        """The state as a dict of tensors, read in the train step."""
        values = {}
        for kind, names in self._order.items():
            flat = self.packed[kind].read_value()
            scalars = [n for n in names if self._shapes[n] == ()]
            if scalars:
                values.update(zip(scalars, tf.unstack(flat[: len(scalars)])))
            vectors = [n for n in names if self._shapes[n] != ()]
            if vectors:
                sizes = [int(np.prod(self._shapes[n])) for n in vectors]
                values.update(zip(vectors, tf.split(flat[len(scalars):], sizes)))
        return values

    def write(self, values):
        """Writes a dict of tensors (as `read` returns them) in the train step."""
        for kind, names in self._order.items():
            scalars = [tf.cast(values[n], kind) for n in names if self._shapes[n] == ()]
            vectors = [tf.cast(values[n], kind) for n in names if self._shapes[n] != ()]
            self.packed[kind].assign(tf.concat(([tf.stack(scalars)] if scalars else []) + vectors, 0))

    def save_own_variables(self, store):
        for name, value in self.numpy().items():
            store[name] = value

    def load_own_variables(self, store):
        keys = set(store.keys())
        if not keys:
            return  # a checkpoint written without AutoClip: start afresh
        missing = [name for name in self.names if name not in keys]
        if missing:
            warnings.warn(
                f"The checkpoint's AutoClip state does not match this AutoClip's policy (missing {missing}); "
                "the clipping statistics start afresh.",
                stacklevel=2,
            )
            return
        values = {name: np.asarray(store[name]) for name in self.names}
        for kind, variable in self.packed.items():
            variable.assign(self._pack_numpy(values, kind))


def _global_norm(tensors):
    """The global L2 norm and whether it is finite (`stats.global_norm_of`: one read of the gradient).

    Finite values whose squares overflow float32 (a norm past 1.8e19) make it
    inf: such a gradient counts as non-finite and is skipped like one.
    Telling the two apart would take a second look at the gradient, behind a
    conditional that costs a few percent of every step
    (docs/PERFORMANCE.md); a norm that large is past the guard's ceiling
    (`MAX_NORM`) anyway.
    """
    from keras_vg import stats

    norm = stats.global_norm_of([stats.dense_values(t) for t in tensors])
    return norm, tf.math.is_finite(norm)


def _norm_of(variables):
    """The global L2 norm of some variables, in float32."""
    from keras_vg import stats

    return stats.global_norm_of([tf.cast(v, tf.float32) for v in variables])


def _sgd_step_size(optimizer):
    """The learning rate where one step moves the weights by `lr · g` at first (Keras's SGD), else None.

    With momentum, later steps move them further (up to `lr/(1−momentum)·g`);
    the first step, the one a too-large learning rate ruins, is `lr · g`
    exactly. Adaptive optimizers (Adam and the like) scale each step by their
    own statistics: None.
    """
    if type(optimizer) is not keras.optimizers.SGD:
        return None
    return tf.convert_to_tensor(optimizer.learning_rate)


def _json_number(value):
    value = float(value)
    return value if math.isfinite(value) else None


class AutoClip(keras.callbacks.Callback):
    """Switches gradient clipping on by itself when gradients explode.

    Until gradients explode nothing is clipped: clipping is *armed*. A spike
    switches clipping on, at the very step it happens; from then on the
    `policy` clips every step that exceeds its threshold. With `cooldown=N`,
    N calm steps in a row (no spike) switch it off again, armed for the next
    explosion. A spike is any of:

    - from the first step on, a global norm at least `spike_factor` times
      the median of the recent norms, or one past 1e18 (`SpikeGuard`);
    - with Keras's `SGD`, a step whose update `lr · ‖g‖` would move the
      weights by `spike_update_ratio` of their norm or more (a learning rate
      too large for the model, often ruinous at the very first step);
    - a gradient holding NaN or inf;
    - the `trigger`'s test, if given one (such as ZClip's z-score against
      running statistics, `trigger=keras_vg.ZScore()`).

    Once on, every step is clipped to the smallest of the policy's target,
    `spike_factor` times the median of the recent norms, and, with `SGD`,
    the norm at which the update would move the weights by
    `clip_update_ratio` of their norm. Before the policy's statistics are
    warm, the guard's bounds are all there is. No statistic ever takes in a
    non-finite norm or a spike: they see each norm clipped at the guard's
    bound, so thresholds stay finite and positive whatever came before.

    Everything is decided inside the compiled train step, from state kept in
    `tf.Variable`s: a policy that switches on causes no retrace, and
    `steps_per_execution > 1`, `jit_compile=True`, `tf.distribute` and
    `mixed_float16` all work. Clipping acts on the gradient the optimizer
    applies: summed over replicas (unlike Keras's `clipnorm`, which clips
    each replica's part, tensorflow#33929) and unscaled under mixed precision.

    A step whose gradient holds NaN or inf (with the policy's
    `skip_nonfinite=True`) is skipped: the weights and every optimizer slot
    (moments, weight decay included) stay bit-identical. The optimizer's
    `iterations` still advances, so that every batch keeps its own step
    number (as `GradientMonitor` records it) and learning-rate schedules
    follow the data; the loss metric of that batch is NaN. Where skipping
    cannot help, AutoClip stops training (`model.stop_training`) with a
    warning that names the step, the last step whose update was applied,
    and what to try: when the weights or the optimizer's slots are
    themselves not finite, or after `skip_patience` skipped steps in a row.
    Both are checked on the host every 32 steps (or second), and at the end
    of each epoch.

    The state (statistics, on/off, counts) is saved with the model's weights
    (`BackupAndRestore`, `ModelCheckpoint`, `model.save_weights`,
    `model.save`), so a resumed run neither forgets its history nor re-arms.
    It is attached to the model when `fit` starts; to restore it with
    `model.load_weights` before `fit` (from a weights file or a `.keras`
    file), call `clip.set_model(model)` first.

    Records, each at optimizer steps that are multiples of `every`: the
    global norm before and after clipping, the threshold, and the number of
    clipped and skipped steps since the previous record; events `clip_on`,
    `clip_off` and `skip` at the step they happen, and a `warning` when
    AutoClip stops training. A `GradientMonitor` on the same model writes
    them into its run; otherwise give `log_dir`.

    Args:
        policy: How to clip once clipping is on: `"zscore"`, `"percentile"`,
            `"agc"`, `"global_norm"` (each with its defaults), or a policy
            object (`keras_vg.ZScore(...)`, ...). Defaults to `"zscore"`.
        trigger: What switches clipping on: `"spike"` (the guard's spikes and
            non-finite gradients), a policy object whose `exceeded` decision
            switches it on as well (`keras_vg.ZScore()` for ZClip's z-score
            test: more sensitive, and on the rescue benchmark it switched on
            in a healthy SGD run), or None for clipping from the first step
            (plain clipping, as in the papers). Defaults to `"spike"`.
        cooldown: Calm steps in a row after which clipping switches off, or
            None to keep it on. Needs a trigger. Defaults to `None`.
        log_dir: Directory to write the records into (one TensorBoard run),
            for use without a `GradientMonitor`. Defaults to `None`.
        every: Record every `every`-th optimizer step. Defaults to `1`.
        verbose: `1` prints a line when clipping switches on or off and when
            a step is skipped; `0` is silent (a stop still warns). Defaults
            to `1`.
        spike_factor: A global norm at least this many times the median of
            the recent norms is a spike, and once clipping is on no norm
            above that is let through. Must be > 1. Defaults to `10.0`.
        spike_update_ratio: With `SGD`, the update ratio `lr·‖g‖/‖W‖` at or
            above which a step is a spike; None to leave this rule out.
            Defaults to `0.2`.
        clip_update_ratio: With `SGD`, the largest update ratio once
            clipping is on; None for no such bound. Defaults to `0.01`.
        skip_patience: Skipped steps in a row after which training stops,
            or None never to stop for that. Defaults to `10`.

    Example:

    ```python
    clip = keras_vg.AutoClip()
    model.fit(x, y, callbacks=[keras_vg.GradientMonitor("logs/run1"), clip])
    keras_vg.read_run("logs/run1").events()   # clip_on / clip_off / skip
    ```
    """

    def __init__(self, policy="zscore", trigger="spike", cooldown=None, log_dir=None, every=1, verbose=1,
                 spike_factor=10.0, spike_update_ratio=0.2, clip_update_ratio=0.01, skip_patience=10):
        super().__init__()
        self.policy = _resolve(policy, "policy")
        if trigger == "spike":
            self.trigger, self._armed = None, True
        elif trigger is None:
            self.trigger, self._armed = None, False
        else:
            self.trigger, self._armed = _resolve(trigger, "trigger"), True
        if cooldown is not None:
            check_positive("cooldown", cooldown, integer=True)
            if not self._armed:
                # Without a trigger clipping is always on: nothing could switch it on again.
                raise ValueError(
                    "`cooldown` needs a trigger that switches clipping on again; with trigger=None clipping "
                    f"is always on. Received: trigger=None, cooldown={cooldown!r}"
                )
        if log_dir is not None and (not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir)):
            raise ValueError(f"`log_dir` must be a non-empty path or None. Received: log_dir={log_dir!r}")
        check_positive("every", every, integer=True)
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
        if skip_patience is not None:
            check_positive("skip_patience", skip_patience, integer=True)
        self.guard = SpikeGuard(factor=spike_factor, spike_update_ratio=spike_update_ratio,
                                clip_update_ratio=clip_update_ratio)
        self._switch = ClipSwitch(self.policy, self.trigger, self.guard, self._armed,
                                  None if cooldown is None else int(cooldown))
        self.cooldown = None if cooldown is None else int(cooldown)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.every = int(every)
        self.verbose = verbose
        self.skip_patience = None if skip_patience is None else int(skip_patience)
        self.trace_count = 0
        self.stopped = None  # the stop's event dict, once AutoClip stopped training
        self._state = None
        self._buffers = None
        self._optimizer = None
        self._installed_model = None
        self._undo = []
        self._flag = threading.local()
        self._writer = None  # for `log_dir`
        self._own_offset = None  # for `log_dir`: added to `iterations` (see `_start_own_axis`)
        self._run = None  # the model's RunLog: a GradientMonitor's run to write into
        self._failed = False
        self._last_read_step = -1
        self._event_cursor = 0
        self._print_cursor = 0
        self._host_events = []  # events made on the host (a stop), not yet written
        self._clip_in_update = False  # set by `_install`
        self._warned_backend = False
        self._host = None  # the host's small device functions (`_HostChecks`)

    def get_config(self):
        trigger = ("spike" if self.trigger is None else repr(self.trigger)) if self._armed else None
        guard = self.guard.get_config()
        return {
            "policy": repr(self.policy), "trigger": trigger,
            "cooldown": self.cooldown, "log_dir": self.log_dir, "every": self.every, "verbose": self.verbose,
            "spike_factor": guard["factor"], "spike_update_ratio": guard["spike_update_ratio"],
            "clip_update_ratio": guard["clip_update_ratio"], "skip_patience": self.skip_patience,
        }

    # State ---------------------------------------------------------------------------

    def set_model(self, model):
        """Attaches the clipping state to `model`, so that weight files carry it.

        `fit` calls this before any callback's `on_train_begin` (and so before
        `BackupAndRestore` restores a checkpoint). Call it yourself before a
        `model.load_weights` that should restore the state.
        """
        super().set_model(model)
        if not self._backend_supported():
            return  # nothing to attach: AutoClip does nothing on this backend (see on_train_begin)
        key = (_config_key(self.policy), _config_key(self.trigger), repr(self.guard), self._armed, self.cooldown)
        state = getattr(model, STATE_ATTRIBUTE, None)
        if state is None or state.key != key:
            # Kept across AutoClip instances with the same configuration: a new
            # callback for a later fit continues the statistics.
            with model.distribute_strategy.scope():
                state = _ClipState(key, self._switch.init(), name="keras_vg_autoclip")
            _keras_compat.attach_saved_state(model, STATE_ATTRIBUTE, state)
        self._state = state
        if self._run is not None and self._run is not RunLog.of(model):
            self._run.leave(self)
        self._run = RunLog.of(model)
        if self.log_dir is None:
            self._run.join(self)  # with a log_dir of its own, AutoClip writes there instead

    @property
    def active(self):
        """Whether clipping is on now (read from the device)."""
        return bool(self._state.numpy()["active"] > 0) if self._state is not None else False

    def state(self):
        """Returns the checkpointed state as numpy values: `active`, `calm`, the counts and the statistics.

        Counts: `clipped` and `skipped` (steps in all), `skip_run` (skipped
        steps in a row), `last_good` (the last step whose update was applied,
        -1 before any). Statistics are prefixed with `guard.`, `policy.` and
        `trigger.`.
        """
        return {} if self._state is None else self._state.numpy()

    # Installation --------------------------------------------------------------------

    def _backend_supported(self):
        """Whether AutoClip can hook this Keras backend's train step; warns once per instance where not.

        A backend it cannot hook must not stop the user's `fit` (the
        README's promise): AutoClip then warns, naming the backend, and does
        nothing. It imports no TensorFlow on that path.
        """
        backend = keras.backend.backend()
        if backend == "tensorflow":
            return True
        if not self._warned_backend:
            self._warned_backend = True
            warnings.warn(
                f"AutoClip clips inside the TensorFlow train step; Keras's {backend!r} backend is not supported "
                "yet. Training goes on without AutoClip: nothing is clipped, skipped or recorded. To clip on "
                f"this backend, give the optimizer a fixed threshold (e.g. global_clipnorm=1.0).",
                stacklevel=3,
            )
        return False

    def on_train_begin(self, logs=None):
        if not self._backend_supported():
            return
        optimizer = getattr(self.model, "optimizer", None)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "AutoClip needs a model compiled with a Keras optimizer. "
                f"Received: optimizer={type(optimizer).__name__}"
            )
        applying = _keras_compat.applying_optimizer(optimizer)
        conflicts = {name: getattr(applying, name, None) for name in ("clipnorm", "clipvalue", "global_clipnorm")}
        conflicts = {name: value for name, value in conflicts.items() if value is not None}
        if conflicts:
            received = ", ".join(f"{name}={value}" for name, value in conflicts.items())
            raise ValueError(
                "AutoClip clips the gradients itself; the optimizer must not clip them as well. "
                f"Remove {', '.join(f'`{n}`' for n in conflicts)} from the optimizer. Received: {received}"
            )
        if self._state is None or not RunLog.of(self.model).has_source(self) and self.log_dir is None:
            self.set_model(self.model)
        self._last_batch = None
        self._pending_steps = 0
        self._last_read = time.monotonic()
        self._failed = False
        self.stopped = None
        self._own_offset = None
        if not self._is_installed(applying):
            self._install(applying)
        if self._host is None or not self._host.serves(self.model, applying):
            # Kept across fits of the same model: a new one would trace its functions again each fit.
            self._host = _HostChecks(self.model, applying)
        self._skipped_seen = int(self._state.numpy()["skipped"])
        self._refresh_weight_norm()

    def _is_installed(self, optimizer):
        # A later fit of the same compiled model reuses the traced function: no retrace.
        return bool(self._undo) and self._optimizer is optimizer and self._installed_model is self.model

    def _install(self, optimizer):
        self.uninstall()
        previous = _installed.get(optimizer)
        if previous is not None and previous is not self:
            previous.uninstall()  # one AutoClip per optimizer: a new callback replaces the old one
        stages = _keras_compat.aggregated_gradient_stages(optimizer)
        if stages is None:
            warnings.warn(
                f"AutoClip cannot hook the optimizer of Keras {keras.__version__} (tested: "
                f"{', '.join(_keras_compat.TESTED_KERAS_VERSIONS)}.x); training runs without it.",
                stacklevel=3,
            )
            return
        self._optimizer = optimizer
        self._installed_model = self.model
        from keras_vg.device_buffers import SPARE_ROWS, sync_on_read

        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        capacity = RECORD_CAPACITY + math.ceil(steps_per_execution / self.every) + 1
        with self.model.distribute_strategy.scope():
            # One spare row past each buffer's capacity: see `_record`.
            self._buffers = {
                # float64: a step number is exact in it. Column 0 is the step (-1: empty).
                "records": sync_on_read(np.concatenate([np.full([capacity + SPARE_ROWS, 1], -1.0),
                                                        np.zeros([capacity + SPARE_ROWS, len(RECORD_COLUMNS)])], 1),
                                         "keras_vg_autoclip_records"),
                "events": sync_on_read(tf.zeros([EVENT_CAPACITY + SPARE_ROWS, 4], tf.float64),
                                       "keras_vg_autoclip_events"),
                # Clipped and skipped steps since the last record, and events in all.
                "counts": sync_on_read(tf.zeros([3], tf.float64), "keras_vg_autoclip_counts"),
                # Measured on the host (`_refresh_weight_norm`), read by the guard's SGD rules.
                "weight_norm": sync_on_read(tf.constant(np.nan, tf.float32), "keras_vg_autoclip_weight_norm"),
            }
        self._capacity = capacity
        # New buffers, whose steps may start again from 0 (a recompile): read them from their start.
        self._last_read_step, self._event_cursor, self._print_cursor = -1, 0, 0
        self.policy.bind(self.model)
        if self.trigger is not None:
            self.trigger.bind(self.model)
        _installed[optimizer] = self
        self._undo.append(stages.add(self._stage, _keras_compat.CLIP))
        self._clip_in_update = False
        if self.policy.skip_nonfinite:
            masked = bool(getattr(self.model, "jit_compile", False))
            remove = _keras_compat.install_update_guard(optimizer, self._take_flag, masked=masked)
            if remove is None:
                warnings.warn("AutoClip cannot skip non-finite steps on this Keras version; they are applied.",
                              stacklevel=3)
            else:
                self._undo.append(remove)
                # A unit-wise clip (AGC) counts what it clipped inside its branch: it keeps its own.
                self._clip_in_update = (not masked and not self.policy.lazy
                                        and self.model.distribute_strategy.num_replicas_in_sync == 1)
        # A train function traced before the hooks would not see them.
        self.model.make_train_function(force=True)

    def uninstall(self):
        """Removes the hooks from the optimizer; a later `fit` without AutoClip runs unclipped. Idempotent."""
        had_hooks = bool(self._undo)
        while self._undo:
            self._undo.pop()()
        if self._optimizer is not None and _installed.get(self._optimizer) is self:
            del _installed[self._optimizer]
        if had_hooks and self.model is not None:
            self.model.make_train_function(force=True)
        self._optimizer = None

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
        state = self._state.read()
        norm, finite = _global_norm(grads)
        step = tf.cast(tf.convert_to_tensor(self._optimizer.iterations), tf.int64)
        step_size = _sgd_step_size(self._optimizer)
        weight_norm = self._buffers["weight_norm"].read_value() if step_size is not None else None
        decision, new_state = self._switch.update(state, norm, finite, step, step_size, weight_norm, grads, variables)

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
            new_state = self._switch.count_clipped(state, new_state, clipped)
        self._state.write(new_state)
        self._record(step, norm, norm_after, decision, clipped)
        return grads

    def _clip(self, decision, norm, grads, variables):
        """The clipping branch: `(grads, clipped, norm_after)`.

        With SGD it also measures ‖W‖ for the guard's rules, here where the
        step pays for a clip anyway: the next steps judge against it.
        """
        if _sgd_step_size(self._optimizer) is not None:
            self._buffers["weight_norm"].assign(_norm_of(variables))
        if not self.policy.lazy:
            return scale_gradients(grads, decision.factor), tf.constant(True), decision.norm_after
        # A unit-wise policy (AGC) on top of the global bounds: each unit takes the smaller factor.
        unitwise, _ = self.policy.update({}, norm, grads, variables)
        factors = [decision.factor if f is None else tf.minimum(f, decision.factor) for f in unitwise.factor]
        clipped = scale_gradients(grads, factors)
        after, _ = _global_norm([g for g in clipped if g is not None])
        return clipped, unitwise.exceeded | (decision.factor < 1.0), after

    def _record(self, step, norm, norm_after, decision, clipped):
        """Writes this step's row (on record steps) and its events into the device buffers."""
        b = self._buffers
        names = ("records", "events", "counts")
        values = _record_values(
            {name: b[name].read_value() for name in names}, step, tf.stack([norm, norm_after, decision.threshold]),
            tf.stack([clipped, decision.skipped, decision.switched_on, decision.switched_off]), self.every,
            self._capacity)
        for name in names:
            b[name].assign(values[name])

    # Host side -------------------------------------------------------------------------

    def read_new(self):
        """Reads the per-step records not read before.

        Returns:
            A list of `(step, values)` sorted by step, `values` a dict from
            `global_grad_norm`, `global_grad_norm_clipped`, `clip_threshold`,
            `clipped` and `skipped` (see `keras_vg.format`) to a float.
        """
        if self._buffers is None:
            return []
        rows = self._buffers["records"].numpy()[: self._capacity]  # not the spare row
        records = []
        for index in np.argsort(rows[:, 0]):
            step = int(rows[index, 0])
            if step < 0 or step <= self._last_read_step:
                continue
            records.append((step, {name: float(value) for name, value in zip(RECORD_COLUMNS, rows[index, 1:])}))
        if records:
            self._last_read_step = records[-1][0]
        return records

    def _events_since(self, cursor, offset=0):
        """Returns `(events, new_cursor)`: the events recorded since `cursor`, oldest first.

        Args:
            cursor: Events counted before (`_event_cursor` or `_print_cursor`).
            offset: Added to each step, in the event and its message (the
                run's step axis; 0 for the optimizer's own numbering).
        """
        if self._buffers is None:
            return [], cursor
        count = int(self._buffers["counts"].numpy()[2])
        if count <= cursor:
            return [], count
        data = self._buffers["events"].numpy()  # step, kind, norm, threshold
        events = []
        first = max(cursor, count - EVENT_CAPACITY)
        if first > cursor:
            events.append({"kind": "warning", "step": int(data[first % EVENT_CAPACITY, 0]) + offset,
                           "message": f"AutoClip: {first - cursor} clipping events were overwritten before "
                                      "they were read."})
        for index in range(first, count):
            step, kind, norm, threshold = data[index % EVENT_CAPACITY]
            events.append(self._event(int(step) + offset, EVENT_CODES[int(kind)], norm, threshold))
        return events, count

    def _event(self, step, kind, norm, threshold):
        if kind == "skip":
            message = (f"Step {step} skipped: its gradient is not finite (global norm {norm:.4g}). "
                       "Weights and optimizer slots are unchanged.")
        elif kind == "clip_on":
            why = f"global norm {norm:.4g} is a spike" if np.isfinite(norm) else "its gradient is not finite"
            message = (f"Gradients exploded at step {step}: {why}. Clipping is on ({self.policy!r}); this step's "
                       f"threshold was {threshold:.4g}.")
        else:
            message = f"Step {step}: {self.cooldown} calm steps; clipping is off (armed again)."
        return {"kind": kind, "step": step, "message": message,
                "global_grad_norm": _json_number(norm), "clip_threshold": _json_number(threshold)}

    def drain_events(self):
        """Returns the clipping events not returned before.

        Steps are the optimizer's `iterations` (what is written into a run
        is on the run's step axis, see `GradientMonitor`).

        Returns:
            A list of event dicts (`kind` one of `clip_on`, `clip_off`,
            `skip`, or `warning` when events were lost or AutoClip stopped
            training; `step`, `message`, `global_grad_norm`,
            `clip_threshold`), oldest first.
        """
        return self._drain_events(0)

    def _drain_events(self, offset):
        events, self._event_cursor = self._events_since(self._event_cursor, offset)
        events += [_stop_event(*stop, offset) for stop in self._host_events]
        self._host_events = []
        return sorted(events, key=lambda event: event["step"])

    # Keras hooks -----------------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        # A batch-begin hook: Keras waits for the device after every step for callbacks with
        # a batch-end hook. The steps counted are those before this batch; the epoch's last
        # ones are read at its end.
        if self._buffers is None:
            return
        if self._own_offset is None and self.log_dir is not None:
            self._start_own_axis()
        if self._last_batch is None:
            self._last_batch = batch
        executed = batch - self._last_batch
        self._last_batch = batch
        self._pending_steps += executed
        if self._pending_steps >= READ_BATCH_RECORDS or time.monotonic() - self._last_read >= READ_INTERVAL_SECS:
            self._host_work(batch_to_come=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = None
        self._refresh_weight_norm()

    def on_epoch_end(self, epoch, logs=None):
        self._host_work()

    def on_train_end(self, logs=None):
        if self._buffers is not None and self._own_offset is None and self.log_dir is not None:
            self._start_own_axis()  # a fit without a batch
        self._host_work()
        if self._writer is not None:
            self._writer.close()

    def _start_own_axis(self):
        """For `log_dir`: continues its step axis after the last step recorded there (as `GradientMonitor`).

        Called at a fit's first batch, once `BackupAndRestore` (whatever its
        place among the callbacks) has restored the optimizer's count: a
        recompile restarts `iterations` at 0, but the steps of one `log_dir`
        only go forward.
        """
        from keras_vg.reader import latest_records

        try:
            if self._writer is not None:
                self._writer.flush()
            last_step, _ = latest_records(self.log_dir)
            iterations = int(self._optimizer.iterations.numpy())
            self._own_offset = 0 if last_step is None else max(0, last_step + 1 - iterations)
        except Exception as error:  # noqa: BLE001 - recording must not kill training; clipping goes on
            self._own_offset = 0
            warnings.warn(f"AutoClip could not read the steps recorded in {self.log_dir!r}: "
                          f"{type(error).__name__}: {error}. Its records start at the optimizer's step.",
                          stacklevel=2)

    def _host_work(self, batch_to_come=False):
        """What the host does every 32 steps or second and at each epoch's end: check, then record.

        Args:
            batch_to_come: Called at a batch's beginning: Keras runs that
                batch before it looks at `model.stop_training`.
        """
        if self._buffers is None:
            return
        self._pending_steps = 0
        self._last_read = time.monotonic()
        try:
            self._check_dead_end(batch_to_come)
        except Exception as error:  # noqa: BLE001 - a failed check must not kill training; clipping goes on
            warnings.warn(f"AutoClip could not check the weights: {type(error).__name__}: {error}.", stacklevel=2)
        self._print_events()
        if self.log_dir is not None:
            self._read_and_write()
        elif self._run is not None and self._run.is_open() and self._run.has_source(self):
            self._run.flush_sources()  # the run's order: every source, this one included

    def _refresh_weight_norm(self):
        """Measures ‖W‖ for the guard's SGD rules, at the start of `fit` and of each epoch (one scalar comes back)."""
        if self._buffers is None or _sgd_step_size(self._optimizer) is None:
            return
        try:
            self._buffers["weight_norm"].assign(self._host.weight_norm())
        except Exception as error:  # noqa: BLE001 - must not kill training; the SGD rules wait for a norm
            warnings.warn(f"AutoClip could not measure the weights' norm: {type(error).__name__}: {error}. "
                          "Its SGD rules wait for the next measure.", stacklevel=2)

    def _check_dead_end(self, batch_to_come=False):
        """Stops training where skipping cannot help: non-finite weights or slots, or too many skips in a row."""
        if self.stopped is not None or self._state is None:
            return
        state = self._state.numpy()
        skipped = int(state["skipped"])
        if skipped == self._skipped_seen:
            return  # nothing skipped since the last check: nothing could have gone wrong this way
        self._skipped_seen = skipped
        run, last_good = int(state["skip_run"]), int(state["last_good"])
        broken = self._host.first_nonfinite()
        if broken is not None:
            reason = f"`{broken}` holds NaN or inf, so skipping non-finite steps cannot help"
        elif self.skip_patience is not None and run >= self.skip_patience:
            reason = f"{run} steps in a row were skipped (skip_patience={self.skip_patience})"
        else:
            return
        # The last step trained: the one about to run, or the last one run.
        self._stop(reason, last_good, int(self._optimizer.iterations.numpy()) - (not batch_to_come))

    def _stop(self, reason, last_good, step):
        self.model.stop_training = True
        self._host_events.append((reason, last_good, step))
        self.stopped = _stop_event(reason, last_good, step, 0)
        # The warning numbers steps as the run does, where one is written.
        warnings.warn(_stop_event(reason, last_good, step, self._offset_now())["message"], stacklevel=3)

    def _offset_now(self):
        """What the run written into adds to the optimizer's steps now (0 where none is known)."""
        if self.log_dir is not None:
            return self._own_offset or 0
        if self._run is not None and self._run.is_open():
            return self._run.offset
        return 0

    def _print_events(self):
        if not self.verbose or self._buffers is None or self._failed:
            return
        try:
            events, self._print_cursor = self._events_since(self._print_cursor, self._offset_now())
        except Exception as error:  # noqa: BLE001 - printing must not kill training
            self._failed = True
            warnings.warn(f"AutoClip stopped reporting after an error: {type(error).__name__}: {error}.",
                          stacklevel=3)
            return
        for event in events:
            print(f"keras-vg AutoClip: {event['message']}", file=sys.stderr)

    def _read_and_write(self, run=None):
        """Reads the records and events not read before and writes them: into `log_dir`, or into `run`."""
        if self._buffers is None or self._failed:
            return
        try:
            if run is None:
                if self._writer is None:
                    from keras_vg.event_writer import EventWriter

                    self._writer = EventWriter(self.log_dir)  # created lazily: no event file when not needed
                writer, offset, with_global_norm = self._writer, self._own_offset or 0, True
            else:
                writer, offset, with_global_norm = run.writer, run.offset, run.with_global_norm
            records = [(step + offset, values) for step, values in self.read_new()]
            events = self._drain_events(offset)
            if run is not None:
                run.add_skipped([(step, values["skipped"]) for step, values in records])
            if records or events:
                write_records(writer, records, events, with_global_norm)
                writer.flush()
        except Exception as error:  # noqa: BLE001 - recording must not kill training; clipping goes on
            self._failed = True
            warnings.warn(
                f"AutoClip stopped recording after an error: {type(error).__name__}: {error}. "
                "Clipping goes on; records written so far are kept.",
                stacklevel=2,
            )

    def flush_into_run(self, run):
        """Writes what the device buffers hold now into a `GradientMonitor`'s run (`RunLog`'s order).

        The monitor calls this (through its `RunLog`) before each of its own
        reads and at the end of `fit`, so that the clipping records land in
        its run on its step axis, and the steps skipped here reach its live
        warnings. An `AutoClip` with its own `log_dir` writes there instead.

        Args:
            run: The model's `keras_vg.run_log.RunLog`, open.
        """
        if self.log_dir is None:
            self._read_and_write(run)

    def close(self):
        """Removes the hooks and closes the writer. Calling it twice is harmless."""
        self.uninstall()
        if self._run is not None:
            self._run.leave(self)
        if self._writer is not None:
            self._writer.close()


def _stop_event(reason, last_good, step, offset):
    """The `warning` event of a stop, its steps shifted by `offset` (the run's step axis)."""
    step, first_bad = step + offset, last_good + 1 + offset
    good = (f"The last good step was {last_good + offset}" if last_good >= 0
            else "No step's update was applied")
    message = (
        f"AutoClip stopped training at step {step}: {reason}. {good}; the steps since were skipped (their "
        f"gradients were not finite). Try: restore the weights saved before step {first_bad} "
        "(keras.callbacks.BackupAndRestore, ModelCheckpoint or model.save), then lower the learning rate, or "
        "clip from the first step (keras_vg.AutoClip(keras_vg.GlobalNorm(1.0), trigger=None)); check the "
        f"input data from step {first_bad} on for NaN or inf."
    )
    return {"kind": "warning", "step": step, "message": message,
            "last_good": last_good + offset if last_good >= 0 else last_good}


def _record_values(buffers, step, norms, flags, every, capacity):
    """The record buffers after one step: its row (on record steps) and its events.

    The buffers are `keras_vg.device_buffers` rings, as the monitor's: a
    step that writes nothing writes into the spare row past the capacity, so
    that every step runs the same few ops (no select over a whole buffer, no
    branch).

    Args:
        buffers: A dict of the buffers' values (see `AutoClip._install`).
        step: The step, int64.
        norms: `[norm, norm_after, threshold]`, float32.
        flags: `[clipped, skipped, switched_on, switched_off]`, bool.
        every: Record every `every`-th step.
        capacity: Rows of the record buffer (without the spare one).

    Returns:
        The dict of the buffers' new values.
    """
    from keras_vg.device_buffers import ring_slot, scatter_rows

    clipped, skipped, switched_on, switched_off = tf.unstack(flags)
    norms = tf.cast(norms, tf.float64)
    at = tf.cast(step, tf.float64)
    is_record = tf.equal(step % every, 0)
    # Clipped and skipped steps since the previous record, this one included; then the event count.
    counts = buffers["counts"] + tf.cast(tf.stack([clipped, skipped, False]), tf.float64)
    row = tf.concat([[at], norms, counts[:2]], 0)
    slot = ring_slot(step // every, capacity, is_record)
    # At most two events a step: a switch (on or off) and a skip.
    switched = switched_on | switched_off
    count = tf.cast(counts[2], tf.int64)
    first = ring_slot(count, EVENT_CAPACITY, switched)
    second = ring_slot(count + tf.cast(switched, tf.int64), EVENT_CAPACITY, skipped)
    kinds = tf.constant([1.0, 3.0], tf.float64) + tf.cast(tf.stack([~switched_on, False]), tf.float64)
    events = tf.concat([tf.fill([2, 1], at), kinds[:, tf.newaxis], tf.tile(norms[tf.newaxis, 0::2], [2, 1])], 1)
    new_count = counts[2] + tf.cast(switched, tf.float64) + tf.cast(skipped, tf.float64)
    return {
        "records": scatter_rows(buffers["records"], slot, row[tf.newaxis]),
        "events": scatter_rows(buffers["events"], tf.stack([first, second]), events),
        "counts": tf.concat([tf.where(is_record, tf.zeros([2], tf.float64), counts[:2]), [new_count]], 0),
    }


class _HostChecks:
    """The small device functions the host runs every 32 steps: the weights' norm, and their finiteness.

    The variables are the functions' arguments, not captured when they are
    traced: a model built by its first step has none at `on_train_begin`,
    and unfreezing layers changes them between fits. The functions trace
    again only when the variables' number, shapes or dtypes change.
    """

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self._norm = tf.function(_norm_of)
        self._finite = tf.function(lambda variables: tf.stack([tf.reduce_all(tf.math.is_finite(v))
                                                               for v in variables]))

    def serves(self, model, optimizer):
        """Whether these functions are for this model and optimizer."""
        return self.model is model and self.optimizer is optimizer

    def weight_norm(self):
        """The global norm of the trainable weights (NaN while the model has none: not yet built)."""
        from keras_vg.weight_updates import backend_value

        variables = [backend_value(v) for v in self.model.trainable_variables]
        return self._norm(variables) if variables else tf.constant(np.nan, tf.float32)

    def _checked(self):
        seen, checked = set(), []
        for variable in list(self.model.weights) + list(self.optimizer.variables):
            if id(variable) not in seen and tf.as_dtype(variable.dtype).is_floating:
                seen.add(id(variable))
                checked.append(variable)
        return checked

    def first_nonfinite(self):
        """The path of the first weight or optimizer slot holding NaN or inf, or None."""
        from keras_vg.weight_updates import backend_value

        checked = self._checked()
        if not checked:
            return None
        finite = self._finite([backend_value(v) for v in checked]).numpy()
        broken = [v for v, ok in zip(checked, finite) if not ok]
        return broken[0].path if broken else None


def write_records(writer, records, events, with_global_norm=True):
    """Writes AutoClip's records and events with an `EventWriter`.

    Args:
        writer: A `keras_vg.event_writer.EventWriter`.
        records: From `AutoClip.read_new()`.
        events: From `AutoClip.drain_events()`.
        with_global_norm: Also write the pre-clip `global_grad_norm` (a
            `GradientMonitor` writes its own). Defaults to `True`.
    """
    for step, values in records:
        names = (("global_grad_norm",) if with_global_norm else ()) + fmt.CLIP_STATS
        scalars = {fmt.SCALARS_GLOBAL_NORM_CLIPPED_TAG: values["global_grad_norm_clipped"]}
        if with_global_norm:
            scalars[fmt.SCALARS_GLOBAL_NORM_TAG] = values["global_grad_norm"]
        writer.write_record(step, {name: (values[name], None) for name in names}, scalars)
    by_step = {}
    for event in events:
        by_step.setdefault(event["step"], []).append(event)
    for step, batch in sorted(by_step.items()):
        writer.write_json(fmt.EVENTS_NAME, step, batch)
