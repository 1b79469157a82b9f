"""Notices non-finite steps between records, from what training computes anyway.

A record step counts the NaN/inf values of its own gradient. The steps between
records run Keras's plain train function, so nothing of ours looks at their
gradients; what they leave behind is enough to say that something went
non-finite, and between which steps:

- the loss tracker's running total, which turns non-finite for the rest of the
  epoch once one step's loss was (each record step notes whether it still is,
  and the host looks again after the epoch's last record);
- a `LossScaleOptimizer` whose loss scale fell below 1: it skipped so many
  steps in a row that even the unscaled gradient is not finite;
- non-finite weights at the next record (an update applied a NaN or inf).

Each is reported once (the loss once per epoch) as a `nonfinite` event
(`keras_vg.format.EVENT_KINDS`). `AutoClip` counts the steps it skips itself.
"""

import keras
import numpy as np

from keras_vg import _keras_compat

SOURCES = ("loss", "loss_scale", "weights")
"""What a `nonfinite` event's evidence came from."""


def loss_tracker(model):
    """The model's `loss` metric (a `keras.metrics.Mean` Keras keeps per epoch), or None."""
    for metric in getattr(model, "metrics", []):
        if isinstance(metric, keras.metrics.Mean) and metric.name == "loss":
            return metric
    return None


class NonfiniteWatch:
    """Finds evidence of non-finite steps between two host reads.

    Args:
        model: The compiled Keras model being trained.

    Example:

    >>> watch = NonfiniteWatch(model)          # doctest: +SKIP
    >>> watch.start_epoch(first_step=0)        # doctest: +SKIP
    >>> events = watch.check(step=40)          # doctest: +SKIP
    """

    def __init__(self, model):
        self._model = model
        self._loss = loss_tracker(model)
        optimizer = model.optimizer
        self._loss_scale = optimizer if _keras_compat.applying_optimizer(optimizer) is not optimizer else None
        self._scale_reported = False
        self._weights_reported = False
        self._last_record_step = None
        self.start_epoch(0)

    def start_epoch(self, first_step):
        """Keras resets the loss tracker at each epoch: the loss may be reported again."""
        self._epoch_first = self._since = first_step
        self._loss_reported = False
        self._last_record_in_epoch = None

    def check(self, step, skipped_steps=0):
        """Returns the events for what happened since the last check, up to (not including) `step`.

        Args:
            step: The step about to run (logged numbering).
            skipped_steps: Steps the host ran that did not advance the
                optimizer's `iterations` since the last check (a
                `LossScaleOptimizer` skipped them).

        Returns:
            A list of event dicts.
        """
        first, last = self._since, step - 1
        self._since = step
        events = []
        if last < first:
            return events
        if self._loss is not None and not self._loss_reported and not np.isfinite(
                _keras_compat.read_variable(self._model, self._loss.total)):
            self._loss_reported = True
            events.append(_event(first, last, "loss", f"The loss became NaN or infinite between steps {first} and "
                                                      f"{last}."))
        if self._loss_scale is not None and not self._scale_reported:
            scale = float(_keras_compat.read_variable(self._model, self._loss_scale.dynamic_scale))
            if scale < 1.0:
                self._scale_reported = True
                skipped = f", skipping {skipped_steps} steps" if skipped_steps else ""
                events.append(_event(first, last, "loss_scale", (
                    f"LossScaleOptimizer's loss scale fell to {scale:.3g} between steps {first} and {last}"
                    f"{skipped}: the gradient is NaN or infinite even unscaled.")))
        return events

    def check_records(self, records):
        """Returns the events that the records show: a loss or weights turned non-finite.

        Each record carries whether the loss tracker was still finite at its
        step (`loss_finite`, taken in the step itself), and the weights'
        norms before its update.

        Args:
            records: `(step, values)` pairs in logged numbering, oldest first.

        Returns:
            A list of event dicts.
        """
        events = []
        for step, values in records:
            previous, previous_in_epoch = self._last_record_step, self._last_record_in_epoch
            self._last_record_step = self._last_record_in_epoch = step
            self._since = step + 1  # what `check` looks at next
            if not self._loss_reported and values.get("loss_finite", 1.0) == 0.0:
                self._loss_reported = True
                first = self._epoch_first if previous_in_epoch is None else previous_in_epoch + 1
                events.append(_event(first, step, "loss", f"The loss became NaN or infinite between steps {first} "
                                                          f"and {step}."))
            weight_norms = values.get("weight_norm")
            if self._weights_reported or weight_norms is None or np.all(np.isfinite(weight_norms)):
                continue
            self._weights_reported = True
            # A record's weight norm is taken before its own update: one of the updates since the
            # previous record broke them.
            first = step if previous is None else previous
            last = max(step - 1, first)
            events.append(_event(first, last, "weights", (
                f"The weights became NaN or infinite between steps {first} and {last}: "
                f"{int(np.count_nonzero(~np.isfinite(weight_norms)))} variables hold NaN or inf.")))
        return events


def _event(first, last, source, message):
    return {"kind": "nonfinite", "step": int(first), "last_step": int(last), "source": source, "message": message}
