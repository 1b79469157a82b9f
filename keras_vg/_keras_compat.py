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

import functools
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


def hook_aggregated_gradients(optimizer, on_gradients):
    """Calls `on_gradients(grads, variables)` with the replica-summed gradients.

    Args:
        optimizer: A Keras TensorFlow-backend optimizer (already unwrapped).
        on_gradients: Called at trace time, in replica context, with the
            list of gradients after the cross-replica sum and the list of
            variables they belong to.

    Returns:
        A function that removes the hook, or None when the hook cannot be
        installed on this Keras version (the caller must then reduce the
        gradients itself).
    """
    if not keras_version_is_tested():
        _warn_untested_once()
        return None
    original = getattr(optimizer, "_all_reduce_sum_gradients", None)
    if original is None:
        return None

    @functools.wraps(original)
    def all_reduce_then_observe(grads_and_vars):
        reduced = original(grads_and_vars)
        pairs = [(g, v) for g, v in reduced]
        on_gradients([g for g, _ in pairs], [v for _, v in pairs])
        return reduced

    optimizer._all_reduce_sum_gradients = all_reduce_then_observe

    def remove():
        if optimizer.__dict__.get("_all_reduce_sum_gradients") is all_reduce_then_observe:
            del optimizer._all_reduce_sum_gradients

    return remove
