"""The one module of keras-vg that touches private Keras or TensorFlow APIs.

Tested with Keras 3.15.1 on TensorFlow 2.21.0 (CPU). On other Keras versions it
warns once and falls back to public APIs only: the numbers stay right, and what
needs the private hook costs more (an extra all-reduce under a strategy).

Private names used here, and why:
- `TFOptimizer._all_reduce_sum_gradients`: the one place where, under
  `tf.distribute`, the gradient the optimizer will apply exists summed over
  replicas. Hooking it gives exact per-variable statistics with no extra
  communication.
"""

import warnings

import keras

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
