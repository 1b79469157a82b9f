"""`GradientMonitor`: the callback users add to `model.fit`."""

import importlib
import os
import sys
import time
import warnings

import keras
import numpy as np

from keras_vg import _keras_compat
from keras_vg import format as fmt
from keras_vg.event_writer import EventWriter
from keras_vg.run_log import RunLog

TAPS = {"tensorflow": ("keras_vg.tap", "Tap"), "jax": ("keras_vg.jax_tap", "JaxTap")}
"""The tap that records in each Keras backend's train step."""

DEFAULT_EVERY = 25
"""The cadence a monitor records at unless told otherwise (see `GradientMonitor`'s `every`)."""

READ_BATCH_RECORDS = 32
"""The host reads the device buffers once this many records are pending..."""

READ_INTERVAL_SECS = 1.0
"""...or once this long has passed since the last read, whichever comes first."""


class GradientMonitor(keras.callbacks.Callback):
    """Records per-layer gradient health inside the train step, for TensorBoard.

    The statistics (see `keras_vg.format`) are computed from the gradients the
    optimizer actually receives, inside the compiled train step: unscaled under
    mixed precision, summed over replicas under `tf.distribute`, before any
    clipping. Each is the recorded step's own value. They are read back in
    batches and written as event files into `log_dir`, which TensorBoard shows
    as one run.

    Steps that record nothing run the train function Keras would run without
    the monitor: between records it costs nothing. Record steps run a second,
    instrumented function, traced once. Non-finite losses, weights and
    loss-scale collapses between records are still noticed, from what
    training computes anyway, and reported with the steps they happened
    between.

    When an episode of vanishing, exploding, non-finite or dead units starts,
    the monitor prints one warning; at the end of training it prints a short
    summary of which layers and which steps.

    Steps are the optimizer's `iterations` before the update. Within one
    `log_dir` they only go forward: a later `fit` whose optimizer starts
    again from 0 (a recompile) continues after the last step recorded.

    Args:
        log_dir: Directory for the event files; one TensorBoard run. It may be
            the same `log_dir` as a `keras.callbacks.TensorBoard`, which
            writes into its `train/` and `validation/` subdirectories.
        every: Record every `every`-th optimizer step. The default, 25, keeps
            the monitor's cost within about 1% of a training step on the
            reference models of docs/PERFORMANCE.md (a record step costs a
            few passes over the parameters plus writing the record), while
            a 1,000-step run still gets 40 records. Defaults to `25`.
        stats: Names of the statistics to record, from
            `keras_vg.format.MONITOR_STATS`, or None for all. Only the work
            that the statistics asked for need is done. Defaults to `None`.
        saturation_epsilon: A sigmoid or tanh activation within this distance
            of an asymptote counts as saturated. Defaults to `0.01`.
        thresholds: A `keras_vg.detect.Thresholds` for the warnings, or None
            for the defaults. Defaults to `None`.
        verbose: `0` silent, `1` prints episode warnings and the summary.
            Defaults to `1`.
        flush_secs: Longest time a record stays in memory before it reaches
            the disk. Defaults to `10`.

    Example:

    ```python
    monitor = keras_vg.GradientMonitor(log_dir="logs/run1")
    model.fit(x, y, epochs=5, callbacks=[monitor])
    steps, names, values = keras_vg.read_run("logs/run1").stat("grad_norm")
    ```
    """

    def __init__(self, log_dir, every=DEFAULT_EVERY, stats=None, saturation_epsilon=0.01,
                 thresholds=None, verbose=1, flush_secs=10):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise ValueError(f"`log_dir` must be a non-empty path. Received: log_dir={log_dir!r}")
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise ValueError(f"`log_dir` must be a directory, but it is a file. Received: log_dir={log_dir!r}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1. Received: every={every!r}")
        if stats is None:
            stats = fmt.MONITOR_STATS
        elif isinstance(stats, str):
            raise ValueError(f"`stats` must be a list of names, not a string. Received: stats={stats!r}")
        unknown = [s for s in stats if s not in fmt.MONITOR_STATS]
        if unknown or not stats:
            raise ValueError(
                f"`stats` must be a non-empty list drawn from {list(fmt.MONITOR_STATS)} (AutoClip records the "
                f"clipping statistics). Received: stats={list(stats)!r}"
            )
        if not 0 < saturation_epsilon < 0.5:
            raise ValueError(
                f"`saturation_epsilon` must be in (0, 0.5). Received: saturation_epsilon={saturation_epsilon!r}"
            )
        from keras_vg.detect import Thresholds

        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise ValueError(
                f"`thresholds` must be a keras_vg.detect.Thresholds or None. Received: thresholds={thresholds!r}"
            )
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
        if not flush_secs > 0:
            raise ValueError(f"`flush_secs` must be > 0. Received: flush_secs={flush_secs!r}")
        self.log_dir = os.fspath(log_dir)
        self.every = int(every)
        self.stats = tuple(s for s in fmt.MONITOR_STATS if s in stats)
        self.saturation_epsilon = saturation_epsilon
        self.thresholds = thresholds
        self.verbose = verbose
        self.flush_secs = flush_secs
        self.tap = None
        self._trained = None  # the model being trained (see set_model)
        self._plain = None  # Keras's own train function
        self._instrumented = None
        self._writer = None
        self._detector = None
        self._watch = None
        self._run = None  # the model's RunLog, which AutoClip writes into as well
        self._offset = 0

    # Keras hooks ---------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        # Keras's `Callback.model` writes the whole JAX training state back into the variables
        # on every access (and has the next step gather it again): the hooks use this instead.
        self._trained = model
        self._run = RunLog.of(model)

    def on_train_begin(self, logs=None):
        self._failed = False
        self._recording = False
        self._host_weight_norms = False
        self._sync = None  # (batch, iterations): the optimizer's count at a batch of this epoch
        self._next_iterations = None  # the count at the next epoch's first batch, when known
        self._pending = 0  # records made since the last read
        self._last_read = time.monotonic()
        # Every process runs the same steps (the functions chosen must match), but the records are
        # the same global ones everywhere: one process reads and writes them.
        self._primary = _keras_compat.is_primary_process()
        self._writer = EventWriter(self.log_dir, flush_secs=self.flush_secs)
        self._guard(self._begin)
        self._guard(self._open_run)

    def on_train_batch_begin(self, batch, logs=None):
        # A batch-begin hook, not batch-end: Keras waits for the device after every step
        # for callbacks with a batch-end hook, to give them the logs; this one needs none.
        if not self._recording:
            return
        if self._sync is None:
            self._guard(lambda: self._start_epoch(batch))
        elif self.tap is not None and self._primary and (self._pending >= READ_BATCH_RECORDS or (
            self._pending and time.monotonic() - self._last_read >= READ_INTERVAL_SECS
        )):
            self._guard(lambda: self._read(batch))
        if self._recording:
            self._guard(lambda: self._choose_function(batch))

    def on_epoch_end(self, epoch, logs=None):
        if self._recording:
            # The epoch's last steps are only known here: one read of the step counter per epoch.
            self._guard(self._end_epoch)
        if self._writer is not None:
            self._guard(self._writer.flush)

    def on_train_end(self, logs=None):
        if self._recording:
            self._guard(self._end_epoch)
        if self._plain is not None and self._trained is not None and self._trained.train_function is self._instrumented:
            self._trained.train_function = self._plain  # a later fit starts from Keras's own function
        if self._run is not None and self._run.owner is self:
            # AutoClip's own on_train_end may come after this one: take its last records first.
            self._guard(self._close_run)
        if self._writer is not None:
            self._guard(self._writer.close)
        if self.verbose and self._detector is not None:
            self._guard(self._print_summary)

    # Work ------------------------------------------------------------------------

    def _begin(self):
        if keras.backend.backend() not in TAPS:
            self._fail_softly(
                f"GradientMonitor records inside the train step of Keras's TensorFlow and JAX backends; the "
                f"{keras.backend.backend()!r} backend is not supported. Nothing is recorded."
            )
            return
        optimizer = getattr(self._trained, "optimizer", None)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            self._fail_softly(
                "GradientMonitor needs a Keras optimizer (model.compile(optimizer=...)). "
                f"Received: {type(optimizer).__name__}. Nothing is recorded."
            )
            return
        self._recording = True

    def _start_epoch(self, batch):
        """At the first batch of an epoch: the step count, and at the first of a fit, the functions."""
        if self._next_iterations is None:
            self._next_iterations = self._iterations()
        self._sync = (batch, self._next_iterations)
        self._next_iterations = None
        if not self._host_weight_norms and (self.tap is None or not self.tap.is_model(self._trained)
                                            or self._trained.train_function not in (self._plain, self._instrumented)):
            self._start_phase()
        if self._run.owner is self:
            self._run.offset = self._offset  # from here on AutoClip writes on this step axis
        self._watch.start_epoch(self._logged(self._sync[1]))

    def _start_phase(self):
        """Sets up recording for the model as compiled now: a new tap and its own train function."""
        from keras_vg.detect import StreamingDetector
        from keras_vg.nonfinite_watch import NonfiniteWatch
        from keras_vg.reader import latest_records

        if self.tap is not None:
            self._read_and_write()  # what the previous compile recorded, under its own offset
            self.tap.uninstall()
        steps_per_execution = int(getattr(self._trained, "steps_per_execution", 1) or 1)
        # Room for a full read batch plus the records of the execution that completes it.
        capacity = READ_BATCH_RECORDS + -(-steps_per_execution // self.every) + 1
        if keras.backend.backend() != "tensorflow":
            from keras_vg.reader import tensorboard_without_tensorflow

            tensorboard_without_tensorflow()  # for the event files; training here needs no TensorFlow
        module, name = TAPS[keras.backend.backend()]
        tap_class = getattr(importlib.import_module(module), name)  # imports only the backend in use
        self.tap = tap_class(self._trained, self.every, capacity, self.stats, self.saturation_epsilon)
        self.tap.install()
        self._plain = self._trained.train_function  # Keras's own (which a tap may have had Keras rebuild)
        self._instrumented = self.tap.make_train_function()
        self._detector = StreamingDetector(self.thresholds)
        self._watch = NonfiniteWatch(self._trained)
        last_step, last_summary = latest_records(self.log_dir)
        # Within one log_dir steps only go forward: an optimizer that starts again from 0
        # (a recompile) or from an older checkpoint continues after the last step recorded.
        self._offset = 0 if last_step is None else max(0, last_step + 1 - self._sync[1])
        self._summary_pending = True
        self._phase_start = self._sync[1]
        self._previous_summary = last_summary
        self._first_instrumented = None

    def _iterations(self):
        return int(_keras_compat.read_variable(self._trained, self._trained.optimizer.iterations))

    def _logged(self, iterations):
        return iterations + self._offset

    def _choose_function(self, batch):
        """Runs the instrumented function for an execution that holds a record step, else Keras's own."""
        self._last_batch = batch + int(getattr(self._trained, "steps_per_execution", 1) or 1) - 1
        start = self._sync[1] + batch - self._sync[0]
        self._check_after_first_record()
        if self._summary_pending and self._primary and self._trained.trainable_variables:
            self._write_summary()
        steps = int(getattr(self._trained, "steps_per_execution", 1) or 1)
        records = (start + steps - 1) // self.every - (start - 1) // self.every
        if self.tap is None:
            if records and self._host_weight_norms and self._primary:
                self._write_host_weight_norms(self._logged(start))
            return
        chosen = self._instrumented if records else self._plain
        if self._trained.train_function is not chosen:  # Keras's attribute tracking costs a millisecond
            self._trained.train_function = chosen
        if records and self._first_instrumented is None:
            self._first_instrumented = start
        self._pending += records

    def _check_after_first_record(self):
        """After the first instrumented execution ran: did the train step reach the optimizer?"""
        if self._first_instrumented is None or self._first_instrumented is False:
            return
        self._first_instrumented = False
        if self.tap.applied:
            return
        if not self._trained.trainable_variables:
            self._fail_softly("The model has no trainable variables; GradientMonitor records nothing.")
            return
        self._fail_softly(
            "GradientMonitor saw no call to optimizer.apply() in the train step "
            "(a custom train_step that updates weights some other way?). Gradient, "
            "update and activation statistics cannot be recorded; only weight norms "
            "are, read from the host."
        )
        self._recording = self._host_weight_norms = True

    def _write_summary(self):
        """The model summary, once its variables exist (after the first step, for a model built then)."""
        from keras_vg.model_summary import summarize_model

        self._summary_pending = False
        summary = summarize_model(self._trained)
        self._warn_if_other_model(summary)
        summary["step_offset"] = self._offset
        self._writer.write_json(fmt.MODEL_NAME, self._logged(self._phase_start), summary)
        self._writer.flush()
        self._detector.set_model(summary)  # the live warnings judge layers as the report does

    def _warn_if_other_model(self, summary):
        previous = self._previous_summary
        if previous is None:
            return
        classes = [layer["class"] for layer in summary["layers"]]
        previous_classes = [layer["class"] for layer in previous.get("layers", [])]
        paths = {path for layer in summary["layers"] for path in layer["variables"]}
        previous_paths = {path for layer in previous.get("layers", []) for path in layer.get("variables", [])}
        if classes != previous_classes and not paths & previous_paths:
            warnings.warn(
                f"`log_dir` {self.log_dir!r} already holds records of another model ({previous.get('name')!r}, "
                f"{len(previous_classes)} layers; this one is {summary['name']!r}, {len(classes)} layers). "
                f"The new records continue its step axis at step {self._logged(self._phase_start)}; nothing "
                "recorded before is lost. Give each experiment a log_dir of its own to keep their runs apart.",
                stacklevel=2,
            )

    def _read(self, batch):
        """Reads the records and re-counts the steps from the optimizer, before `batch` runs."""
        predicted = self._sync[1] + batch - self._sync[0]
        iterations = self._iterations()
        self._sync = (batch, iterations)
        self._read_and_write(self._logged(iterations), skipped_steps=max(0, predicted - iterations))

    def _end_epoch(self):
        iterations = self._iterations()
        if self._host_weight_norms and self._sync is not None:
            # A train step that bypasses the optimizer does not advance its count: count the batches.
            iterations = self._sync[1] + self._last_batch + 1 - self._sync[0]
        self._next_iterations = iterations
        self._sync = None
        if self.tap is not None and self._primary:
            self._read_and_write(self._logged(iterations))

    def _open_run(self):
        """Owns the model's run for this fit: an `AutoClip` on the model writes into this writer.

        The offset comes at the first batch (`_start_epoch`), once the
        optimizer's count is known; until then AutoClip keeps its records.
        """
        self._run.open(self, self._writer,
                       with_global_norm="global_grad_norm" not in self.stats or not self._recording,
                       wants_skipped=self._recording)

    def _close_run(self):
        """The last flush of the sources, on this fit's step axis; then the run has no owner."""
        try:
            if self._run.offset is None and self._primary:
                # No batch ran while recording (or recording failed): place the sources' records
                # after the run's last step, as a new compile would.
                from keras_vg.reader import latest_records

                self._writer.flush()
                last_step, _ = latest_records(self.log_dir)
                iterations = self._iterations()
                self._run.offset = self._offset if last_step is None else max(self._offset,
                                                                               last_step + 1 - iterations)
            if self._primary:
                self._run.flush_sources()
        finally:
            self._run.close(self)

    def close(self):
        """Removes the tap from the model, so that a later `fit` runs exactly as without keras-vg.

        Until then, the optimizer and activation layers keep wrappers that
        pass straight through outside the monitor's own train function.
        Calling `close` twice is harmless.
        """
        if self.tap is not None:
            self.tap.uninstall()
            if self._trained is not None and self._trained.train_function is self._instrumented:
                self._trained.train_function = self._plain
        self.tap = None
        self._plain = self._instrumented = None
        if self._writer is not None:
            self._writer.close()

    def _read_and_write(self, next_step=None, skipped_steps=0):
        """Writes the records made since the last read, and the events they and the steps since show.

        Args:
            next_step: The (logged) step about to run, to look for non-finite
                steps since the last record; None not to look.
            skipped_steps: Steps run since the last read that did not advance
                the optimizer's count.
        """
        self._pending = 0
        self._last_read = time.monotonic()
        if self._summary_pending and self._trained.trainable_variables:
            self._write_summary()  # before the detector judges layers by it
        if self._run.owner is self and self._run.is_open():
            self._run.flush_sources()  # AutoClip first: its skipped steps are judged with these records
        skipped = self._run.take_skipped() if self._run.owner is self else []
        records = [(self._logged(step), values) for step, values in self.tap.read_new()]
        events = self._watch.check_records(records)
        if next_step is not None:
            events += self._watch.check(next_step, skipped_steps)
        if records:
            names = {name: self.tap.names_for(name) for name in self.stats if name in records[0][1]}
            for step, values in records:
                self._write_record(step, values, names)
            # One vectorised pass of the rules over the whole batch of records.
            steps = np.array([step for step, _ in records])
            stacked = {name: np.stack([values[name] for _, values in records]) for name in names}
        else:
            steps, stacked, names = np.zeros([0], np.int64), {}, {}
        if records or skipped:
            # AutoClip's skipped steps: episodes of their own ("skipped by AutoClip"), never a stall.
            skipped = (np.array([s for s, _ in skipped], np.int64),
                       np.array([c for _, c in skipped], np.float32)) if skipped else None
            events += [{"kind": "alert", "step": episode.first_step, "message": episode.message}
                       for episode in self._detector.observe_many(steps, stacked, names, skipped=skipped)]
        for event in events:
            self._writer.write_json(fmt.EVENTS_NAME, event["step"], [event])
            if self.verbose:
                print(f"keras-vg warning: {event['message']}", file=sys.stderr)

    def _write_record(self, step, values, names):
        record = {
            name: (values[name], names[name]) for name in names
            if fmt.axis_of(name) == fmt.AXIS_SCALAR or names[name]
        }
        scalars = {}
        if "global_grad_norm" in values:
            scalars[fmt.SCALARS_GLOBAL_NORM_TAG] = values["global_grad_norm"]
        self._writer.write_record(step, record, scalars)

    def _print_summary(self):
        summary = self._detector.summary()
        if summary:
            print(f"keras-vg summary ({self.log_dir}):\n{summary}", file=sys.stderr)

    def _write_host_weight_norms(self, step):
        variables = self._trained.trainable_variables
        norms = [float(np.linalg.norm(_keras_compat.read_variable(self._trained, v).astype(np.float64)))
                 for v in variables]
        self._writer.write_stat("weight_norm", step, norms, [v.path for v in variables])

    def _fail_softly(self, message):
        warnings.warn(message, stacklevel=3)
        self._recording = False
        if self.tap is not None:
            self.tap.uninstall()
            if self._trained is not None and self._trained.train_function is self._instrumented:
                self._trained.train_function = self._plain
        self.tap = None
        self._instrumented = None

    def _guard(self, work):
        """Runs host-side work; a failure warns once and never stops the user's fit."""
        try:
            work()
        except Exception as error:  # noqa: BLE001 - monitoring must not kill training
            if not self._failed:
                self._failed = True
                self._recording = False
                if self._trained is not None and self._plain is not None:
                    self._trained.train_function = self._plain
                warnings.warn(
                    f"GradientMonitor stopped recording after an error: {type(error).__name__}: {error}. "
                    "Training goes on; records written so far are kept.",
                    stacklevel=2,
                )
            if self._writer is not None:
                try:
                    self._writer.flush()
                except Exception:  # noqa: BLE001
                    pass
