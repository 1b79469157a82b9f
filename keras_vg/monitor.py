"""`GradientMonitor`: the callback users add to `model.fit`."""

import math
import os
import sys
import time
import warnings

import keras
import numpy as np

from keras_vg import _keras_compat
from keras_vg import format as fmt
from keras_vg.event_writer import EventWriter

READ_BATCH_RECORDS = 32
"""The host reads the device buffers once this many records are pending..."""

READ_INTERVAL_SECS = 1.0
"""...or once this long has passed since the last read, whichever comes first."""


class GradientMonitor(keras.callbacks.Callback):
    """Records per-layer gradient health inside the train step, for TensorBoard.

    The statistics (see `keras_vg.format`) are computed from the gradients the
    optimizer actually receives, inside the compiled train step: unscaled under
    mixed precision, summed over replicas under `tf.distribute`, before any
    clipping. They are read back every `every` steps and written as event
    files into `log_dir`, which TensorBoard shows as one run.

    When an episode of vanishing, exploding, non-finite or dead units starts,
    the monitor prints one warning; at the end of training it prints a short
    summary of which layers and which steps.

    Args:
        log_dir: Directory for the event files; one TensorBoard run. It may be
            the same `log_dir` as a `keras.callbacks.TensorBoard`, which
            writes into its `train/` and `validation/` subdirectories.
        every: Record every `every`-th optimizer step. Defaults to `1`.
        stats: Names of the statistics to record, from
            `keras_vg.format.STATS`, or None for all. Only the work that
            the statistics asked for need is done. Defaults to `None`.
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
    monitor = keras_vg.GradientMonitor(log_dir="logs/run1", every=10)
    model.fit(x, y, epochs=5, callbacks=[monitor])
    steps, names, values = keras_vg.read_run("logs/run1").stat("grad_norm")
    ```
    """

    def __init__(self, log_dir, every=1, stats=None, saturation_epsilon=0.01,
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
        self._writer = None
        self._detector = None
        self._traced_train_function = None
        self._autoclip = None

    # Keras hooks ---------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._failed = False
        self._host_weight_norms = False
        self._host_step = self._start_step = 0
        self._epoch_offset = None
        self._pending = 0
        self._last_read = time.monotonic()
        self._checked_apply = False
        self._writer = EventWriter(self.log_dir, flush_secs=self.flush_secs)
        self._guard(self._begin)
        self._guard(self._lend_writer_to_autoclip)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_offset = None  # the host step of this epoch's batch 0, known at its first batch

    def on_train_batch_begin(self, batch, logs=None):
        # A batch-begin hook, not batch-end: Keras waits for the device after every step
        # for callbacks with a batch-end hook, to give them the logs; this one needs none.
        if self._epoch_offset is None:
            self._epoch_offset = self._host_step - batch
        self._account(self._epoch_offset + batch)

    def on_epoch_end(self, epoch, logs=None):
        if self._is_recording():
            # The epoch's last steps are only known here: one read of the step counter per epoch.
            self._guard(lambda: self._account(self._steps_done()))
        # An exception in a later epoch skips on_train_end; what is recorded must be on disk.
        if self.tap is not None and not self._failed and self._pending:
            self._guard(self._read_and_write)
        if self._writer is not None:
            self._guard(self._writer.flush)

    def _account(self, steps_done):
        """Counts the steps run so far and reads the records when enough are waiting."""
        if not self._is_recording():
            return
        previous, self._host_step = self._host_step, steps_done
        if self.tap is not None and not self._checked_apply and steps_done > self._start_step:
            self._checked_apply = True
            if self.tap.trace_count == 0:
                self._guard(self._no_apply_fallback)
        # Record steps are multiples of `every`; count those among the steps just run.
        self._pending += (self._host_step - 1) // self.every - (previous - 1) // self.every
        if self.tap is None:
            if self._pending:
                self._pending = 0
                self._guard(self._write_host_weight_norms)
        elif self._pending >= READ_BATCH_RECORDS or (
            self._pending and time.monotonic() - self._last_read >= READ_INTERVAL_SECS
        ):
            self._guard(self._read_and_write)

    def _is_recording(self):
        return not self._failed and (self.tap is not None or self._host_weight_norms)

    def _steps_done(self):
        # Without a tap (a train_step that never calls apply) the counter may not move.
        optimizer = _keras_compat.applying_optimizer(self.model.optimizer)
        return max(self._host_step, int(np.asarray(optimizer.iterations)))

    def on_train_end(self, logs=None):
        if self.tap is not None and not self._failed:
            self._guard(self._read_and_write)
        if self._autoclip is not None:
            # AutoClip's own on_train_end may come after this one: take its last records first.
            self._guard(self._autoclip.write_pending)
            self._autoclip.write_into(None)
            self._autoclip = None
        if self._writer is not None:
            self._guard(self._writer.close)
        if self.verbose and self._detector is not None:
            self._guard(self._print_summary)

    def _print_summary(self):
        summary = self._detector.summary()
        if summary:
            print(f"keras-vg summary ({self.log_dir}):\n{summary}", file=sys.stderr)

    # Work ------------------------------------------------------------------------

    def _begin(self):
        from keras_vg.model_summary import summarize_model

        if keras.backend.backend() != "tensorflow":
            self._fail_softly(
                f"GradientMonitor records inside the TensorFlow train step; the "
                f"{keras.backend.backend()!r} backend is not supported. Nothing is recorded."
            )
            return
        optimizer = getattr(self.model, "optimizer", None)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            self._fail_softly(
                "GradientMonitor needs a Keras optimizer (model.compile(optimizer=...)). "
                f"Received: {type(optimizer).__name__}. Nothing is recorded."
            )
            return
        if not self.model.trainable_variables:
            self._fail_softly("The model has no trainable variables yet; nothing is recorded.")
            return
        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        # Room for a full read batch plus the records of the execution that completes it.
        capacity = READ_BATCH_RECORDS + math.ceil(steps_per_execution / self.every) + 1
        if not self._tap_is_reusable(capacity):
            self._install_tap(capacity)
        step = int(np.asarray(self.tap.optimizer.iterations))
        self._host_step = self._start_step = step
        summary = summarize_model(self.model)
        self._writer.write_json(fmt.MODEL_NAME, step, summary)
        self._writer.flush()
        self._detector.set_model(summary)  # the live warnings judge layers as the report does

    def _lend_writer_to_autoclip(self):
        """Has the model's `AutoClip`, if any, write its records and events into this run."""
        from keras_vg.clipping import autoclip_for

        clip = autoclip_for(self.model)
        if clip is not None and clip.log_dir is None:
            clip.write_into(self._writer, with_global_norm="global_grad_norm" not in self.stats or self.tap is None)
            self._autoclip = clip

    def _tap_is_reusable(self, capacity):
        """A later fit of the same model reuses the traced function: no retrace per fit."""
        tap = self.tap
        return (
            tap is not None
            and tap.model is self.model
            and self.model.train_function is self._traced_train_function
            and tap.capacity >= capacity
            and [id(v) for v in tap.variables] == [id(v) for v in self.model.trainable_variables]
        )

    def _install_tap(self, capacity):
        from keras_vg.detect import StreamingDetector
        from keras_vg.tap import Tap

        if self.tap is not None:
            self.tap.uninstall()
        self.tap = Tap(self.model, self.every, capacity, self.stats, self.saturation_epsilon)
        self.tap.install()
        # A train function traced before the wrapping would not see it.
        self.model.make_train_function(force=True)
        self._traced_train_function = self.model.train_function
        self._detector = StreamingDetector(self.thresholds)

    def close(self):
        """Removes the tap from the model, so that a later `fit` runs exactly as without keras-vg.

        Until then, a `fit` without this callback still runs the tap's few
        reductions (nothing is written). Calling `close` twice is harmless.
        """
        if self.tap is not None:
            self.tap.uninstall()
            if self.model is not None and self.model.train_function is self._traced_train_function:
                self.model.make_train_function(force=True)
        self.tap = None
        self._traced_train_function = None
        if self._writer is not None:
            self._writer.close()

    def _read_and_write(self):
        self._pending = 0
        self._last_read = time.monotonic()
        records = self.tap.read_new()
        if not records:
            return
        names = {name: self.tap.names_for(name) for name in self.stats if name in records[0][1]}
        for step, values in records:
            self._write_record(step, values, names)
        # One vectorised pass of the rules over the whole batch of records.
        steps = np.array([step for step, _ in records])
        stacked = {name: np.stack([values[name] for _, values in records]) for name in names}
        self._report(self._detector.observe_many(steps, stacked, names))

    def _write_record(self, step, values, names):
        record = {
            name: (values[name], names[name]) for name in names
            if fmt.axis_of(name) == fmt.AXIS_SCALAR or names[name]
        }
        scalars = {}
        if "global_grad_norm" in values:
            scalars[fmt.SCALARS_GLOBAL_NORM_TAG] = values["global_grad_norm"]
        self._writer.write_record(step, record, scalars)

    def _report(self, episodes):
        """Writes an alert event at the step each new episode starts, and warns once about it."""
        for episode in episodes:
            event = {"kind": "alert", "step": episode.first_step, "message": episode.message}
            self._writer.write_json(fmt.EVENTS_NAME, episode.first_step, [event])
            if self.verbose:
                print(f"keras-vg warning: {episode.message}", file=sys.stderr)

    def _no_apply_fallback(self):
        self._fail_softly(
            "GradientMonitor saw no call to optimizer.apply() in the train step "
            "(a custom train_step that updates weights some other way?). Gradient, "
            "update and activation statistics cannot be recorded; only weight norms "
            "are, read from the host."
        )
        self._host_weight_norms = True

    def _write_host_weight_norms(self):
        variables = self.model.trainable_variables
        norms = [float(np.linalg.norm(np.asarray(v, dtype=np.float64))) for v in variables]
        self._writer.write_stat("weight_norm", self._host_step - 1, norms, [v.path for v in variables])

    def _fail_softly(self, message):
        warnings.warn(message, stacklevel=3)
        if self.tap is not None:
            self.tap.uninstall()
        self.tap = None
        self._traced_train_function = None

    def _guard(self, work):
        """Runs host-side work; a failure warns once and never stops the user's fit."""
        try:
            work()
        except Exception as error:  # noqa: BLE001 - monitoring must not kill training
            if not self._failed:
                self._failed = True
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
