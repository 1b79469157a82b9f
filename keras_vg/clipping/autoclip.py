"""`AutoClip`: the callback that switches gradient clipping on when gradients explode.

This module is the callback's wiring: its arguments, the Keras hooks, and
when the other parts run. The parts, one job each:

- `in_step.py`: the hooks on the optimizer and the train step they run
  (TensorFlow); `jax_step.py`: the same on Keras's JAX backend;
- `switch.py`: the per-step decision, a pure function;
- `saved_state.py`: the state saved with the model's weights;
- `records.py`: the device buffers of records and events, read into a run;
- `dead_end.py`: the host's checks for where skipping cannot help.
"""

import os
import time
import warnings
import weakref

import keras

from keras_vg import _keras_compat
from keras_vg.clipping.agc import AGC
from keras_vg.clipping.dead_end import DeadEndWatch, stop_event
from keras_vg.clipping.global_norm import GlobalNorm
from keras_vg.clipping.guard import SpikeGuard
from keras_vg.clipping.in_step import ClipStep, sgd_step_size
from keras_vg.clipping.percentile import Percentile
from keras_vg.clipping.policy import ClipPolicy, check_positive
from keras_vg.clipping.records import ClipRecords, write_records
from keras_vg.clipping.saved_state import STATE_ATTRIBUTE, ClipState, config_key
from keras_vg.clipping.switch import ClipSwitch
from keras_vg.clipping.zscore import ZScore
from keras_vg.run_log import RunLog

__all__ = ["POLICIES", "AutoClip", "write_records"]

POLICIES = {"zscore": ZScore, "percentile": Percentile, "agc": AGC, "global_norm": GlobalNorm}
"""Policies by the names `AutoClip(policy=...)` accepts, each with its defaults."""

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


def _step_class():
    """The in-step part for the Keras backend in use (JAX's imported only there)."""
    if keras.backend.backend() == "jax":
        from keras_vg.clipping.jax_step import JaxClipStep

        return JaxClipStep
    return ClipStep


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
    variables: a policy that switches on causes no retrace, and
    `steps_per_execution > 1`, `jit_compile=True`, `tf.distribute` and
    `mixed_float16` all work. On Keras's JAX backend the same decision runs
    in the jitted step, with the state in variables Keras threads through it
    (`keras.distribution.DataParallel` included); on torch AutoClip warns
    once and does nothing. Clipping acts on the gradient the optimizer
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
    Both are checked on the host every 32 steps (or second; with several
    JAX processes, every 32 steps, so that all stop at the same step), and at
    the end of each epoch.

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
        self.stopped = None  # the stop's event dict, once AutoClip stopped training
        self._state = None
        self._run = None  # the model's RunLog: a GradientMonitor's run to write into
        self._warned_backend = False
        self._processes = 1  # JAX processes training together (`on_train_begin`)
        self._records = ClipRecords(self.policy, self.cooldown, self.log_dir, self.every)
        self._step = _step_class()(self._switch, self.policy, self.trigger, self._records)
        self._dead_end = DeadEndWatch(self.skip_patience)

    def get_config(self):
        trigger = ("spike" if self.trigger is None else repr(self.trigger)) if self._armed else None
        guard = self.guard.get_config()
        return {
            "policy": repr(self.policy), "trigger": trigger,
            "cooldown": self.cooldown, "log_dir": self.log_dir, "every": self.every, "verbose": self.verbose,
            "spike_factor": guard["factor"], "spike_update_ratio": guard["spike_update_ratio"],
            "clip_update_ratio": guard["clip_update_ratio"], "skip_patience": self.skip_patience,
        }

    @property
    def trace_count(self):
        """How many times the train step was traced with AutoClip's CLIP stage."""
        return self._step.trace_count

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
        key = (config_key(self.policy), config_key(self.trigger), repr(self.guard), self._armed, self.cooldown)
        state = getattr(model, STATE_ATTRIBUTE, None)
        if state is None or state.key != key:
            # Kept across AutoClip instances with the same configuration: a new
            # callback for a later fit continues the statistics.
            if keras.backend.backend() == "jax":
                from keras_vg.clipping.jax_step import JaxClipState

                state = JaxClipState(model, key, self._switch.init())
                _keras_compat.attach_metric(model, STATE_ATTRIBUTE, state)
                # Keras fixes the training state's layout when it makes the train function.
                model.make_train_function(force=True)
            else:
                with model.distribute_strategy.scope():
                    state = ClipState(key, self._switch.init(), name="keras_vg_autoclip")
                _keras_compat.attach_saved_state(model, STATE_ATTRIBUTE, state)
        self._state = self._step.state = state
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
        if backend in ("tensorflow", "jax"):
            return True
        if not self._warned_backend:
            self._warned_backend = True
            warnings.warn(
                f"AutoClip clips inside the TensorFlow and JAX train steps; Keras's {backend!r} backend is not "
                "supported. Training goes on without AutoClip: nothing is clipped, skipped or recorded. To clip on "
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
        self._processes = _keras_compat.process_count()
        self._records.start_fit()
        self.stopped = None
        if not self._step.installed_for(applying, self.model):
            self._install(applying)
        self._dead_end.start(self.model, applying, int(self._state.numpy()["skipped"]))
        self._refresh_weight_norm()

    def _install(self, optimizer):
        self.uninstall()
        previous = _installed.get(optimizer)
        if previous is not None and previous is not self:
            previous.uninstall()  # one AutoClip per optimizer: a new callback replaces the old one
        if not self._step.install(optimizer, self.model):
            return
        _installed[optimizer] = self
        # A train function traced before the hooks would not see them.
        self.model.make_train_function(force=True)

    def uninstall(self):
        """Removes the hooks from the optimizer; a later `fit` without AutoClip runs unclipped. Idempotent."""
        optimizer = self._step.optimizer
        had_hooks = self._step.uninstall()
        if optimizer is not None and _installed.get(optimizer) is self:
            del _installed[optimizer]
        if had_hooks and self.model is not None:
            self.model.make_train_function(force=True)

    # Host side -------------------------------------------------------------------------

    def read_new(self):
        """Reads the per-step records not read before.

        Returns:
            A list of `(step, values)` sorted by step, `values` a dict from
            `global_grad_norm`, `global_grad_norm_clipped`, `clip_threshold`,
            `clipped` and `skipped` (see `keras_vg.format`) to a float.
        """
        return self._records.read_new()

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
        return self._records.drain_events(0)

    # Keras hooks -----------------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        # A batch-begin hook: Keras waits for the device after every step for callbacks with
        # a batch-end hook. The steps counted are those before this batch; the epoch's last
        # ones are read at its end.
        if self._records.buffers is None:
            return
        if self._records.own_offset is None and self.log_dir is not None:
            self._records.start_own_axis(self._step.optimizer)
        if self._last_batch is None:
            self._last_batch = batch
        executed = batch - self._last_batch
        self._last_batch = batch
        self._pending_steps += executed
        # Several processes must stop at the same step: they look at the same step counts, not clocks.
        timed = self._processes == 1 and time.monotonic() - self._last_read >= READ_INTERVAL_SECS
        if self._pending_steps >= READ_BATCH_RECORDS or timed:
            self._host_work(batch_to_come=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = None
        self._refresh_weight_norm()

    def on_epoch_end(self, epoch, logs=None):
        self._host_work()

    def on_train_end(self, logs=None):
        if self._records.buffers is not None and self._records.own_offset is None and self.log_dir is not None:
            self._records.start_own_axis(self._step.optimizer)  # a fit without a batch
        self._host_work()
        self._records.close()

    def _host_work(self, batch_to_come=False):
        """What the host does every 32 steps or second and at each epoch's end: check, then record.

        Args:
            batch_to_come: Called at a batch's beginning: Keras runs that
                batch before it looks at `model.stop_training`.
        """
        if self._records.buffers is None:
            return
        self._pending_steps = 0
        self._last_read = time.monotonic()
        try:
            self._check_dead_end(batch_to_come)
        except Exception as error:  # noqa: BLE001 - a failed check must not kill training; clipping goes on
            warnings.warn(f"AutoClip could not check the weights: {type(error).__name__}: {error}.", stacklevel=2)
        if self.verbose:
            self._records.print_events(self._records.offset_now(self._run))
        if self.log_dir is not None:
            self._read_and_write()
        elif self._run is not None and self._run.is_open() and self._run.has_source(self):
            self._run.flush_sources()  # the run's order: every source, this one included

    def _refresh_weight_norm(self):
        """Measures ‖W‖ for the guard's SGD rules, at the start of `fit` and of each epoch (one scalar comes back)."""
        if self._records.buffers is None or sgd_step_size(self._step.optimizer) is None:
            return
        try:
            self._records.buffers["weight_norm"].assign(self._dead_end.host.weight_norm())
        except Exception as error:  # noqa: BLE001 - must not kill training; the SGD rules wait for a norm
            warnings.warn(f"AutoClip could not measure the weights' norm: {type(error).__name__}: {error}. "
                          "Its SGD rules wait for the next measure.", stacklevel=2)

    def _check_dead_end(self, batch_to_come=False):
        """Stops training where skipping cannot help: non-finite weights or slots, or too many skips in a row."""
        if self.stopped is not None or self._state is None:
            return
        found = self._dead_end.check(self._state.numpy())
        if found is None:
            return
        reason, last_good = found
        # The last step trained: the one about to run, or the last one run.
        step = int(_keras_compat.read_variable(self.model, self._step.optimizer.iterations)) - (not batch_to_come)
        self.model.stop_training = True
        self._records.add_stop(reason, last_good, step)
        self.stopped = stop_event(reason, last_good, step, 0)
        # The warning numbers steps as the run does, where one is written.
        warnings.warn(stop_event(reason, last_good, step, self._records.offset_now(self._run))["message"],
                      stacklevel=2)

    def _read_and_write(self, run=None):
        # One frame, as `flush_into_run`'s and `_host_work`'s: the records' warnings name their caller.
        self._records.read_and_write(run)

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
        self._records.close()
