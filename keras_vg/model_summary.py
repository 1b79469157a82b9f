"""A small, JSON-ready description of a model's architecture.

The diagnosis picks remedies from it (no BatchNorm advice for a model that has
BatchNorm, gating for a SimpleRNN), so it records exactly what those choices
need and nothing else.
"""

import keras

from keras_vg.layers import activation_name, walk_layers


def _initializer_name(layer):
    initializer = getattr(layer, "kernel_initializer", None)
    if initializer is None:
        return None
    return type(initializer).__name__


def summarize_model(model):
    """Describes a model's layers for the diagnosis.

    Args:
        model: A built Keras model.

    Returns:
        A dict with `name`, `optimizer`, and `layers`: a list, in model
        order, of dicts with `name`, `class`, `activation`,
        `kernel_initializer` and `variables` (their paths); plus the flags
        `has_batch_norm`, `has_residual_add` and `recurrent` (class names).

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="relu")])
    >>> summarize_model(model)["layers"][0]["activation"]
    'relu'
    """
    layers = []
    for layer in walk_layers(model):
        layers.append({
            "name": layer.name,
            "class": type(layer).__name__,
            "activation": activation_name(layer),
            "kernel_initializer": _initializer_name(layer),
            "variables": [v.path for v in layer.trainable_variables],
        })
    classes = {entry["class"] for entry in layers}
    optimizer = getattr(model, "optimizer", None)
    return {
        "name": model.name,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "layers": layers,
        "has_batch_norm": bool(classes & {"BatchNormalization", "LayerNormalization", "GroupNormalization"}),
        "has_residual_add": "Add" in classes,
        "recurrent": sorted(
            entry["class"] for entry in layers
            if entry["class"] in {"SimpleRNN", "LSTM", "GRU", "RNN", "Bidirectional"}
        ),
        "keras_version": keras.__version__,
    }
