"""`GradientMonitor`: the callback users add to `model.fit`."""

import math
import os
import sys
import warnings

import keras
import numpy as np

from keras_vg import format as fmt
from keras_vg.event_writer import EventWriter


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
            `keras_vg.format.STATS`, or None for all. Defaults to `None`.
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
            stats = fmt.STATS
        elif isinstance(stats, str):
            raise ValueError(f"`stats` must be a list of names, not a string. Received: stats={stats!r}")
        unknown = [s for s in stats if s not in fmt.STAT_AXES]
        if unknown or not stats:
            raise ValueError(
                f"`stats` must be a non-empty list drawn from {list(fmt.STATS)}. Received: stats={list(stats)!r}"
            )
        if not 0 < saturation_epsilon < 0.5:
            raise ValueError(
                f"`saturation_epsilon` must be in (0, 0.5). Received: saturation_epsilon={saturation_epsilon!r}"
            )
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
        if not flush_secs > 0:
            raise ValueError(f"`flush_secs` must be > 0. Received: flush_secs={flush_secs!r}")
        self.log_dir = os.fspath(log_dir)
        self.every = int(every)
        self.stats = tuple(s for s in fmt.STATS if s in stats)
        self.saturation_epsilon = saturation_epsilon
        self.thresholds = thresholds
        self.verbose = verbose
        self.flush_secs = flush_secs
        self.tap = None
        self._writer = None

    # Keras hooks ---------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._failed = False
        self._host_weight_norms = False
        self._host_step = 0
        self._last_batch = -1
        self._checked_apply = False
        self._writer = EventWriter(self.log_dir, flush_secs=self.flush_secs)
        from keras_vg.detect import StreamingDetector

        self._detector = StreamingDetector(self.thresholds)
        self.tap = None
        self._guard(self._begin)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        if self._failed or (self.tap is None and not self._host_weight_norms):
            return
        executed = batch - self._last_batch
        self._last_batch = batch
        previous, self._host_step = self._host_step, self._host_step + executed
        if self.tap is not None and not self._checked_apply:
            self._checked_apply = True
            if self.tap.trace_count == 0:
                self._guard(self._no_apply_fallback)
        if (self._host_step - 1) // self.every > (previous - 1) // self.every:
            self._guard(self._read_and_write if self.tap is not None else self._write_host_weight_norms)

    def on_epoch_end(self, epoch, logs=None):
        # An exception in a later epoch skips on_train_end; what is recorded must be on disk.
        if self._writer is not None:
            self._guard(self._writer.flush)

    def on_train_end(self, logs=None):
        if self.tap is not None and not self._failed:
            self._guard(self._read_and_write)
        if self.tap is not None:
            self.tap.uninstall()
            # The train function traced with the tap would keep writing its
            # buffers in a later fit without this callback.
            self._guard(lambda: self.model.make_train_function(force=True))
        if self._writer is not None:
            self._writer.close()
        if self.verbose and getattr(self, "_detector", None) is not None:
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
        from keras_vg.tap import Tap

        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        capacity = math.ceil(steps_per_execution / self.every) + 2
        self.tap = Tap(self.model, self.every, capacity, self.stats, self.saturation_epsilon)
        self.tap.install()
        self.model.make_train_function(force=True)
        step = int(np.asarray(self.tap.optimizer.iterations))
        self._host_step = step
        self._writer.write_json(fmt.MODEL_NAME, step, summarize_model(self.model))
        self._writer.flush()

    def _read_and_write(self):
        for step, values in self.tap.read_new():
            self._write_record(step, values)

    def _write_record(self, step, values):
        names = {}
        for name in self.stats:
            if name not in values:
                continue
            names[name] = self.tap.names_for(name)
            if fmt.axis_of(name) == fmt.AXIS_SCALAR:
                self._writer.write_stat(name, step, values[name])
            elif names[name]:
                self._writer.write_stat(name, step, values[name], names[name])
        if "global_grad_norm" in values:
            self._writer.write_scalar(fmt.SCALARS_GLOBAL_NORM_TAG, step, values["global_grad_norm"])
        episodes = self._detector.observe(step, values, names)
        if episodes:
            events = [{"kind": "alert", "step": step, "message": e.message} for e in episodes]
            self._writer.write_json(fmt.EVENTS_NAME, step, events)
            if self.verbose:
                for event in events:
                    print(f"keras-vg warning: {event['message']}", file=sys.stderr)

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
