"""AutoClip's host checks for dead ends: where skipping non-finite steps cannot help, training stops.

Two dead ends: a weight or optimizer slot that itself holds NaN or inf
(every later gradient is non-finite too), and `skip_patience` skipped steps
in a row. The host looks every 32 steps (or second) and at each epoch's end,
and only when a step was skipped since it last looked.
"""

import keras
import numpy as np
from keras import ops

from keras_vg import _keras_compat
from keras_vg.clipping.policy import weights_norm


def _all_finite(values):
    return ops.stack([ops.all(ops.isfinite(v)) for v in values])


def _compiled(function):
    """`function` compiled for the backend: traced again only when its arguments' shapes or dtypes change."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(function)
    from keras_vg.clipping._tf import tf

    return tf.function(function)


class HostChecks:
    """The small device functions the host runs every 32 steps: the weights' norm, and their finiteness.

    The variables' values are the functions' arguments, not captured when
    they are traced: a model built by its first step has none at
    `on_train_begin`, and unfreezing layers changes them between fits. The
    functions trace again only when the variables' number, shapes or dtypes
    change. On JAX the values are those of Keras's training state.

    Args:
        model: The model whose weights are checked.
        optimizer: Its optimizer (the one applying updates), whose slots are
            checked.

    Example:

    ```python
    checks = HostChecks(model, model.optimizer)
    checks.first_nonfinite()   # None, or e.g. "sequential/dense/kernel"
    ```
    """

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self._norm = _compiled(weights_norm)
        self._finite = _compiled(_all_finite)

    def serves(self, model, optimizer):
        """Whether these functions are for this model and optimizer."""
        return self.model is model and self.optimizer is optimizer

    def _values(self, variables):
        return [_keras_compat.current_value(self.model, v) for v in variables]

    def weight_norm(self):
        """The global norm of the trainable weights (0, no scale for the SGD rules, while there are none)."""
        variables = self.model.trainable_variables
        return float(self._norm(self._values(variables))) if variables else 0.0

    def _checked(self):
        seen, checked = set(), []
        for variable in list(self.model.weights) + list(self.optimizer.variables):
            if id(variable) not in seen and keras.backend.is_float_dtype(variable.dtype):
                seen.add(id(variable))
                checked.append(variable)
        return checked

    def first_nonfinite(self):
        """The path of the first weight or optimizer slot holding NaN or inf, or None."""
        checked = self._checked()
        if not checked:
            return None
        finite = np.asarray(self._finite(self._values(checked)))
        broken = [v for v, ok in zip(checked, finite) if not ok]
        return broken[0].path if broken else None


class DeadEndWatch:
    """Decides, on the host, whether training has reached a dead end.

    Args:
        skip_patience: Skipped steps in a row after which training stops, or
            None never to stop for that.

    Example:

    ```python
    watch = DeadEndWatch(skip_patience=10)
    watch.start(model, optimizer, skipped=0)
    watch.check(state.numpy())   # None, or (reason, last_good)
    ```
    """

    def __init__(self, skip_patience):
        self.skip_patience = skip_patience
        self.host = None  # the `HostChecks`, kept across fits of the same model
        self._skipped_seen = 0

    def start(self, model, optimizer, skipped):
        """Prepares a fit's checks.

        Args:
            model: The model being fit.
            optimizer: Its optimizer (the one applying updates).
            skipped: Steps skipped in all so far (the saved state's count).
        """
        if self.host is None or not self.host.serves(model, optimizer):
            # Kept across fits of the same model: a new one would trace its functions again each fit.
            self.host = HostChecks(model, optimizer)
        self._skipped_seen = skipped

    def check(self, state):
        """Looks for a dead end.

        Args:
            state: The saved state as numpy values (`ClipState.numpy()`).

        Returns:
            `(reason, last_good)` where training must stop, `last_good` the
            last step whose update was applied (-1 before any); else None.
        """
        skipped = int(state["skipped"])
        if skipped == self._skipped_seen:
            return None  # nothing skipped since the last check: nothing could have gone wrong this way
        self._skipped_seen = skipped
        run, last_good = int(state["skip_run"]), int(state["last_good"])
        broken = self.host.first_nonfinite()
        if broken is not None:
            return f"`{broken}` holds NaN or inf, so skipping non-finite steps cannot help", last_good
        if self.skip_patience is not None and run >= self.skip_patience:
            return f"{run} steps in a row were skipped (skip_patience={self.skip_patience})", last_good
        return None


def stop_event(reason, last_good, step, offset):
    """The `warning` event of a stop, its steps shifted by `offset` (the run's step axis).

    Args:
        reason: Why training stops (from `DeadEndWatch.check`).
        last_good: The last step whose update was applied, -1 before any.
        step: The optimizer step at which training stops.
        offset: Added to the steps (the run's step axis; 0 for the
            optimizer's own numbering).

    Returns:
        The event dict: `kind` ("warning"), `step`, `message`, `last_good`.

    Example:

    >>> event = stop_event("12 steps in a row were skipped", 4, 17, 100)
    >>> event["step"], event["last_good"], event["message"][:40]
    (117, 104, 'AutoClip stopped training at step 117: 1')
    """
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
