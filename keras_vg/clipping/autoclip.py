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
import tensorflow as tf

from keras_vg import _keras_compat, stats
from keras_vg import format as fmt
from keras_vg.clipping.agc import AGC
from keras_vg.clipping.global_norm import GlobalNorm
from keras_vg.clipping.percentile import Percentile
from keras_vg.clipping.policy import ClipPolicy, check_positive
from keras_vg.clipping.zscore import ZScore

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

_registry = weakref.WeakKeyDictionary()  # model -> the AutoClip attached to it
_installed = weakref.WeakKeyDictionary()  # optimizer -> the AutoClip whose hooks it carries


def autoclip_for(model):
    """Returns the `AutoClip` attached to a model (by `fit`, or `set_model`), or None.

    This is how `GradientMonitor` finds the clipping records to write beside
    its own.
    """
    return _registry.get(model)


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
    """The state saved with the model's weights: policy and trigger statistics, on/off, calm steps."""

    def __init__(self, key, initial, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.key = key
        self.state_variables = {
            name: tf.Variable(
                value, trainable=False, name="keras_vg_autoclip_" + name.replace(".", "_"),
                # Every replica computes the same values from the summed gradient:
                # each writes its own copy without communication.
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            for name, value in initial.items()
        }

    def save_own_variables(self, store):
        for name, variable in self.state_variables.items():
            store[name] = np.asarray(variable.numpy())

    def load_own_variables(self, store):
        keys = set(store.keys())
        if not keys:
            return  # a checkpoint written without AutoClip: start afresh
        missing = [name for name in self.state_variables if name not in keys]
        if missing:
            warnings.warn(
                f"The checkpoint's AutoClip state does not match this AutoClip's policy (missing {missing}); "
                "the clipping statistics start afresh.",
                stacklevel=2,
            )
            return
        for name, variable in self.state_variables.items():
            variable.assign(np.asarray(store[name]))


def _sync_on_read(value, name):
    return tf.Variable(
        value, trainable=False, name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def _global_norm(tensors):
    """The global L2 norm and whether every value is finite.

    The usual step pays one fused reduction per tensor and no branch work:
    only where the sum of squares is not finite (a NaN or inf, or squares past
    float32's range) does the rare branch look again, over one flat copy of
    the gradient, so that a finite gradient of norm 1e20 reads 1e20, not inf.
    """
    total = 2.0 * tf.add_n([tf.nn.l2_loss(t) for t in tensors])

    def look_again():
        flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)
        finite = tf.reduce_all(tf.math.is_finite(flat))
        peak = tf.reduce_max(tf.abs(flat))
        scale = tf.where(finite & (peak > 0), peak, 1.0)
        norm = tf.where(finite, scale * tf.sqrt(tf.reduce_sum(tf.square(flat / scale))), tf.sqrt(total))
        return norm, finite

    return _keras_compat.unlowered_cond(tf.math.is_finite(total), lambda: (tf.sqrt(total), tf.constant(True)),
                                        look_again)


def _json_number(value):
    value = float(value)
    return value if math.isfinite(value) else None


class AutoClip(keras.callbacks.Callback):
    """Switches gradient clipping on by itself when gradients explode.

    Until gradients explode nothing is clipped: clipping is *armed*. A step
    whose global gradient norm is a spike for the `trigger` (by default
    ZClip's z-score test against running statistics), or whose gradient is
    not finite, switches clipping on; from then on the `policy` clips every
    step that exceeds its threshold. With `cooldown=N`, N calm steps in a row
    (no spike) switch it off again, armed for the next explosion.

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
    follow the data; the loss metric of that batch is NaN.

    The state (policy statistics, on/off) is saved with the model's weights
    (`BackupAndRestore`, `ModelCheckpoint`, `model.save_weights`), so a
    resumed run neither forgets its history nor re-arms. It is attached to
    the model when `fit` starts; to restore it with `model.load_weights`
    before `fit`, call `clip.set_model(model)` first.

    Records, each at optimizer steps that are multiples of `every`: the
    global norm before and after clipping, the threshold, and the number of
    clipped and skipped steps since the previous record; events `clip_on`,
    `clip_off` and `skip` at the step they happen. A `GradientMonitor` on the
    same model writes them into its run; otherwise give `log_dir`.

    Args:
        policy: How to clip once clipping is on: `"zscore"`, `"percentile"`,
            `"agc"`, `"global_norm"` (each with its defaults), or a policy
            object (`keras_vg.ZScore(...)`, ...). Defaults to `"zscore"`.
        trigger: When clipping switches on: `"spike"` (a `ZScore` spike
            test; a `ZScore` policy is its own trigger), a policy object
            whose `exceeded` decision is the trigger, or None for clipping
            from the first step (plain clipping, as in the papers). Non-finite
            gradients always switch clipping on. Defaults to `"spike"`.
        cooldown: Calm steps in a row after which clipping switches off, or
            None to keep it on. Needs a trigger. Defaults to `None`.
        log_dir: Directory to write the records into (one TensorBoard run),
            for use without a `GradientMonitor`. Defaults to `None`.
        every: Record every `every`-th optimizer step. Defaults to `1`.
        verbose: `1` prints a line when clipping switches on or off and when
            a step is skipped; `0` is silent. Defaults to `1`.

    Example:

    ```python
    clip = keras_vg.AutoClip(policy="zscore")
    model.fit(x, y, callbacks=[keras_vg.GradientMonitor("logs/run1"), clip])
    keras_vg.read_run("logs/run1").events()   # clip_on / clip_off / skip
    ```
    """

    def __init__(self, policy="zscore", trigger="spike", cooldown=None, log_dir=None, every=1, verbose=1):
        super().__init__()
        self.policy = _resolve(policy, "policy")
        if trigger == "spike":
            self.trigger = None if isinstance(self.policy, ZScore) else ZScore()
            self._armed = True
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
        self.cooldown = None if cooldown is None else int(cooldown)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.every = int(every)
        self.verbose = verbose
        self.trace_count = 0
        self._state = None
        self._buffers = None
        self._optimizer = None
        self._installed_model = None
        self._undo = []
        self._flag = threading.local()
        self._writer = None
        self._shared = None  # (writer, with_global_norm) lent by a GradientMonitor
        self._failed = False
        self._last_read_step = -1
        self._event_cursor = 0
        self._print_cursor = 0

    def get_config(self):
        trigger = ("spike" if self.trigger is None else repr(self.trigger)) if self._armed else None
        return {
            "policy": repr(self.policy), "trigger": trigger,
            "cooldown": self.cooldown, "log_dir": self.log_dir, "every": self.every, "verbose": self.verbose,
        }

    # State ---------------------------------------------------------------------------

    def _initial_state(self):
        initial = {"active": np.float32(0.0 if self._armed else 1.0), "calm": np.float32(0.0)}
        initial.update({"policy." + k: v for k, v in self.policy.init().items()})
        if self.trigger is not None:
            initial.update({"trigger." + k: v for k, v in self.trigger.init().items()})
        return initial

    def set_model(self, model):
        """Attaches the clipping state to `model`, so that weight files carry it.

        `fit` calls this before any callback's `on_train_begin` (and so before
        `BackupAndRestore` restores a checkpoint). Call it yourself before a
        `model.load_weights` that should restore the state.
        """
        super().set_model(model)
        key = (_config_key(self.policy), _config_key(self.trigger), self._armed, self.cooldown)
        state = getattr(model, STATE_ATTRIBUTE, None)
        if state is None or state.key != key:
            # Kept across AutoClip instances with the same configuration: a new
            # callback for a later fit continues the statistics.
            with model.distribute_strategy.scope():
                state = _ClipState(key, self._initial_state(), name="keras_vg_autoclip")
            _keras_compat.attach_saved_state(model, STATE_ATTRIBUTE, state)
        self._state = state
        _registry[model] = self

    @property
    def active(self):
        """Whether clipping is on now (read from the device)."""
        return bool(self._state.state_variables["active"].numpy() > 0) if self._state is not None else False

    # Installation --------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"AutoClip clips inside the TensorFlow train step; other backends are not supported. "
                f"Received: backend={keras.backend.backend()!r}"
            )
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
        if self._state is None or autoclip_for(self.model) is not self:
            self.set_model(self.model)
        self._last_batch = None
        self._pending_steps = 0
        self._last_read = time.monotonic()
        self._failed = False
        if not self._is_installed(applying):
            self._install(applying)

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
        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        capacity = RECORD_CAPACITY + math.ceil(steps_per_execution / self.every) + 1
        with self.model.distribute_strategy.scope():
            self._buffers = {
                "steps": _sync_on_read(tf.fill([capacity], tf.constant(-1, tf.int64)), "keras_vg_autoclip_steps"),
                "records": _sync_on_read(tf.zeros([capacity, len(RECORD_COLUMNS)]), "keras_vg_autoclip_records"),
                "window": _sync_on_read(tf.zeros([2]), "keras_vg_autoclip_window"),
                "event_steps": _sync_on_read(tf.zeros([EVENT_CAPACITY], tf.int64), "keras_vg_autoclip_event_steps"),
                "event_data": _sync_on_read(tf.zeros([EVENT_CAPACITY, 3]), "keras_vg_autoclip_event_data"),
                "event_count": _sync_on_read(tf.zeros([], tf.int64), "keras_vg_autoclip_event_count"),
            }
        self._capacity = capacity
        self.policy.bind(self.model)
        if self.trigger is not None:
            self.trigger.bind(self.model)
        _installed[optimizer] = self
        self._undo.append(stages.add(self._stage, _keras_compat.CLIP))
        if self.policy.skip_nonfinite:
            remove = _keras_compat.install_update_guard(optimizer, self._take_flag,
                                                        masked=bool(getattr(self.model, "jit_compile", False)))
            if remove is None:
                warnings.warn("AutoClip cannot skip non-finite steps on this Keras version; they are applied.",
                              stacklevel=3)
            else:
                self._undo.append(remove)
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
            clipped, finite = self._decide([grads[i] for i in present], [variables[i] for i in present])
            for i, g in zip(present, clipped):
                new_grads[i] = g
            if self.policy.skip_nonfinite:
                self._flag.value = finite
        return new_grads

    def _decide(self, grads, variables):
        variables_state = self._state.state_variables
        state = {name: variable.read_value() for name, variable in variables_state.items()}
        norm, finite = _global_norm([stats.dense_values(g) for g in grads])

        def sub_state(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        new_state = {}
        decision = None
        if self.trigger is not None:
            trigger_decision, trigger_state = self.trigger.update(sub_state("trigger."), norm, grads, variables)
            new_state.update({"trigger." + k: v for k, v in trigger_state.items()})
            spike = trigger_decision.exceeded
        else:
            decision, policy_state = self.policy.update(sub_state("policy."), norm, grads, variables)
            new_state.update({"policy." + k: v for k, v in policy_state.items()})
            spike = decision.exceeded
        spike = finite & spike

        was_active = state["active"] > 0
        active = was_active | spike | tf.logical_not(finite) if self._armed else tf.constant(True)
        if decision is None:
            if self.policy.lazy and self._armed:
                # A stateless policy's decision only matters once clipping is on: until then
                # the train step does not pay for it (AGC reads every weight).
                outcome = _keras_compat.unlowered_cond(
                    active & finite, lambda: self._decide_and_clip(norm, grads, variables),
                    lambda: (list(grads), tf.constant(False), tf.constant(np.nan), norm))
            else:
                decision, policy_state = self.policy.update(sub_state("policy."), norm, grads, variables)
                new_state.update({"policy." + k: v for k, v in policy_state.items()})
        if decision is not None:
            clip = active & finite & decision.exceeded
            outcome = (_keras_compat.unlowered_cond(clip, lambda: self.policy.clip(decision, grads),
                                                    lambda: list(grads)),
                       clip, decision.threshold, tf.where(clip, decision.norm_after, norm))
        grads, clip, threshold, norm_after = outcome

        calm = tf.where(active & finite & tf.logical_not(spike), state["calm"] + 1.0, 0.0)
        switch_off = active & (calm >= self.cooldown) if self.cooldown is not None else tf.constant(False)
        new_state["active"] = tf.cast(active & tf.logical_not(switch_off), tf.float32)
        new_state["calm"] = tf.where(switch_off, 0.0, calm)
        for name, value in new_state.items():
            keep = state[name]
            # A non-finite norm says nothing about the statistics: they keep their old values.
            if name.startswith(("policy.", "trigger.")):
                value = tf.where(finite, value, keep)
            variables_state[name].assign(tf.cast(value, keep.dtype))

        skipped = tf.logical_not(finite) & self.policy.skip_nonfinite
        self._record(norm, norm_after, threshold, clip, skipped,
                     switched_on=active & tf.logical_not(was_active), switched_off=switch_off)
        return grads, finite

    def _decide_and_clip(self, norm, grads, variables):
        decision, _ = self.policy.update({}, norm, grads, variables)
        clipped = _keras_compat.unlowered_cond(decision.exceeded, lambda: self.policy.clip(decision, grads),
                                               lambda: list(grads))
        return clipped, decision.exceeded, tf.cast(decision.threshold, tf.float32), decision.norm_after

    def _record(self, norm, norm_after, threshold, clip, skipped, switched_on, switched_off):
        """Writes this step's row (on record steps) and its events into the device buffers."""
        b = self._buffers
        step = tf.cast(tf.convert_to_tensor(self._optimizer.iterations), tf.int64)
        is_record = tf.equal(step % self.every, 0)
        slot = (step // self.every) % self._capacity
        window = b["window"].read_value() + tf.stack([tf.cast(clip, tf.float32), tf.cast(skipped, tf.float32)])
        row = tf.stack([norm, norm_after, threshold, window[0], window[1]])
        at_slot = is_record & tf.equal(tf.range(self._capacity, dtype=tf.int64), slot)
        b["records"].assign(tf.where(at_slot[:, tf.newaxis], row[tf.newaxis, :], b["records"].read_value()))
        b["steps"].assign(tf.where(at_slot, step, b["steps"].read_value()))
        b["window"].assign(tf.where(is_record, tf.zeros([2]), window))

        # At most two events a step: a switch (on or off) and a skip. No scatter: SyncOnRead
        # variables have none in a replica context, and the buffers are small.
        switched = switched_on | switched_off
        kind = tf.where(switched_on, 1.0, 2.0)
        count = b["event_count"].read_value()
        positions = tf.range(EVENT_CAPACITY, dtype=tf.int64)
        first = switched & tf.equal(positions, count % EVENT_CAPACITY)
        second = skipped & tf.equal(positions, (count + tf.cast(switched, tf.int64)) % EVENT_CAPACITY)
        data = tf.stack([norm, threshold])
        event_steps = tf.where(first | second, step, b["event_steps"].read_value())
        event_data = tf.where(first[:, tf.newaxis], tf.concat([[kind], data], 0)[tf.newaxis, :],
                              b["event_data"].read_value())
        event_data = tf.where(second[:, tf.newaxis], tf.concat([[3.0], data], 0)[tf.newaxis, :], event_data)
        b["event_steps"].assign(event_steps)
        b["event_data"].assign(event_data)
        b["event_count"].assign(count + tf.cast(switched, tf.int64) + tf.cast(skipped, tf.int64))

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
        steps = self._buffers["steps"].numpy()
        rows = self._buffers["records"].numpy()
        records = []
        for index in np.argsort(steps):
            step = int(steps[index])
            if step < 0 or step <= self._last_read_step:
                continue
            records.append((step, {name: float(value) for name, value in zip(RECORD_COLUMNS, rows[index])}))
        if records:
            self._last_read_step = records[-1][0]
        return records

    def _events_since(self, cursor):
        """Returns `(events, new_cursor)`: the events recorded since `cursor`, oldest first."""
        if self._buffers is None:
            return [], cursor
        count = int(self._buffers["event_count"].numpy())
        if count <= cursor:
            return [], count
        steps = self._buffers["event_steps"].numpy()
        data = self._buffers["event_data"].numpy()
        events = []
        first = max(cursor, count - EVENT_CAPACITY)
        if first > cursor:
            events.append({"kind": "warning", "step": int(steps[first % EVENT_CAPACITY]),
                           "message": f"AutoClip: {first - cursor} clipping events were overwritten before "
                                      "they were read."})
        for index in range(first, count):
            slot = index % EVENT_CAPACITY
            events.append(self._event(int(steps[slot]), EVENT_CODES[int(data[slot, 0])], data[slot, 1],
                                      data[slot, 2]))
        return events, count

    def _event(self, step, kind, norm, threshold):
        if kind == "skip":
            message = (f"Step {step} skipped: its gradient is not finite (global norm {norm:.4g}). "
                       "Weights and optimizer slots are unchanged.")
        elif kind == "clip_on":
            why = (f"global norm {norm:.4g} is a spike" + (f" (threshold {threshold:.4g})"
                                                             if np.isfinite(threshold) else "")
                   if np.isfinite(norm) else "its gradient is not finite")
            message = f"Gradients exploded at step {step}: {why}. Clipping is on ({self.policy!r})."
        else:
            message = f"Step {step}: {self.cooldown} calm steps; clipping is off (armed again)."
        return {"kind": kind, "step": step, "message": message,
                "global_grad_norm": _json_number(norm), "clip_threshold": _json_number(threshold)}

    def drain_events(self):
        """Returns the clipping events not returned before.

        Returns:
            A list of event dicts (`kind` one of `clip_on`, `clip_off`,
            `skip`, or `warning` when events were lost; `step`, `message`,
            `global_grad_norm`, `clip_threshold`), oldest first.
        """
        events, self._event_cursor = self._events_since(self._event_cursor)
        return events

    # Keras hooks -----------------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        # A batch-begin hook: Keras waits for the device after every step for callbacks with
        # a batch-end hook. The steps counted are those before this batch; the epoch's last
        # ones are read at its end.
        if self._buffers is None or (self.log_dir is None and self._shared is None and not self.verbose):
            return
        if self._last_batch is None:
            self._last_batch = batch
        executed = batch - self._last_batch
        self._last_batch = batch
        self._pending_steps += executed
        if self._pending_steps >= READ_BATCH_RECORDS * self.every or (
            time.monotonic() - self._last_read >= READ_INTERVAL_SECS
        ):
            self._read_and_write()

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = None

    def on_epoch_end(self, epoch, logs=None):
        self._read_and_write()

    def on_train_end(self, logs=None):
        self._read_and_write()
        if self._writer is not None:
            self._writer.close()

    def _read_and_write(self):
        if self._buffers is None or self._failed:
            return
        self._pending_steps = 0
        self._last_read = time.monotonic()
        try:
            if self.verbose:
                events, self._print_cursor = self._events_since(self._print_cursor)
                for event in events:
                    print(f"keras-vg AutoClip: {event['message']}", file=sys.stderr)
            if self.log_dir is not None or self._shared is not None:
                self._write(self.read_new(), self.drain_events())
        except Exception as error:  # noqa: BLE001 - recording must not kill training; clipping goes on
            self._failed = True
            warnings.warn(
                f"AutoClip stopped recording after an error: {type(error).__name__}: {error}. "
                "Clipping goes on; records written so far are kept.",
                stacklevel=2,
            )

    def _write(self, records, events):
        if not records and not events:
            return
        if self.log_dir is not None:
            if self._writer is None:
                from keras_vg.event_writer import EventWriter

                self._writer = EventWriter(self.log_dir)  # created lazily: no event file when not needed
            writer, with_global_norm = self._writer, True
        else:
            writer, with_global_norm = self._shared
        write_records(writer, records, events, with_global_norm)
        writer.flush()

    def write_into(self, writer, with_global_norm=False):
        """Writes the records and events into another run's writer from now on (None: stop).

        `GradientMonitor` lends its writer this way, so that the clipping
        records land in its run, and takes it back before closing it. An
        `AutoClip` with its own `log_dir` keeps writing there.

        Args:
            writer: A `keras_vg.event_writer.EventWriter`, or None.
            with_global_norm: Also write the pre-clip `global_grad_norm`
                (when the writer's owner does not). Defaults to `False`.
        """
        self._shared = None if writer is None else (writer, with_global_norm)

    def write_pending(self):
        """Reads and writes what the device buffers hold now (called by `GradientMonitor`)."""
        self._read_and_write()

    def close(self):
        """Removes the hooks and closes the writer. Calling it twice is harmless."""
        self.uninstall()
        if self._writer is not None:
            self._writer.close()


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
