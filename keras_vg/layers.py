"""What keras-vg needs to know about a model's layers, read from the layers themselves.

Which layers there are (`walk_layers`), which activation each applies to its
output (`activation_name`), where its units are (`unit_axis`), when one of its
units passes no gradient (`dead_unit_gate`) and which saturate
(`saturation_kind`). It works on models that are not built yet: nothing here
needs a layer's variables or output shape. It imports Keras, not TensorFlow.
What each activation does to gradients, by name, is `keras_vg.activations`
(free of Keras, for the report).

Example:

>>> model = keras.Sequential([keras.layers.Dense(4, activation="relu")])  # doctest: +SKIP
>>> [activation_name(layer) for layer in walk_layers(model)]             # doctest: +SKIP
['relu']
"""

import collections

import keras

from keras_vg.activations import SATURATING

DEAD_UNIT_SLOPE = 1e-3
"""A unit is dead when its activation's slope is below this fraction of its slope on the
positive side for every sample: ELU and SELU units deep on their negative side pass
(almost) no gradient, as ReLU units below 0 pass none."""

_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805

Gate = collections.namedtuple("Gate", ["low", "high"])
Gate.__doc__ = """Outputs between `low` and `high` (exclusive; None: unbounded) pass gradient.

A unit passes gradient on a batch when at least one of its outputs lies in
that open interval.
"""


def walk_layers(model):
    """Yields the leaf layers of a model in model order, entering nested models.

    Args:
        model: A Keras model, built or not.

    Returns:
        A generator of layers.
    """
    for layer in model.layers:
        inner = getattr(layer, "layers", None)
        if inner and isinstance(layer, keras.Model):
            yield from walk_layers(layer)
        else:
            yield layer


def activation_name(layer):
    """Returns the name of the activation a layer applies to its output, or None.

    Recurrent layers return None: their `activation` acts inside the cell, not
    on what the layer outputs.

    Args:
        layer: A Keras layer.

    Returns:
        A lower-case name such as `"relu"`, or None.
    """
    if isinstance(layer, keras.layers.RNN):
        return None
    activation = getattr(layer, "activation", None)
    if activation is not None:
        name = getattr(activation, "__name__", None) or type(activation).__name__
        return name.lower()
    if isinstance(layer, keras.layers.ReLU) and float(layer.negative_slope) > 0:
        return "leaky_relu"
    by_class = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu", "PReLU": "prelu"}
    return by_class.get(type(layer).__name__)


def unit_axis(layer):
    """The axis of a layer's output that runs along its units (channels)."""
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


def dead_unit_gate(layer):
    """Returns the outputs through which a unit of `layer` passes gradient, or None.

    None for layers whose units cannot die: no ReLU-family activation, or one
    whose slope never vanishes (leaky ReLU, PReLU).

    Args:
        layer: A Keras layer.

    Returns:
        A `Gate`, or None.

    Example:

    >>> dead_unit_gate(keras.layers.Dense(4, activation="relu"))  # doctest: +SKIP
    Gate(low=0.0, high=None)
    """
    name = activation_name(layer)
    if name == "relu":
        if isinstance(layer, keras.layers.ReLU):
            if float(layer.threshold) != 0.0:
                return None  # its zero output no longer tells a closed unit from an open one
            high = layer.max_value
            return Gate(0.0, None if high is None else float(high))
        return Gate(0.0, None)
    if name == "relu6":
        return Gate(0.0, 6.0)
    if name == "elu":
        # ELU's slope below 0 is y + alpha, its slope above 0 is 1.
        alpha = float(getattr(layer, "alpha", 1.0))
        return Gate(alpha * (DEAD_UNIT_SLOPE - 1.0), None)
    if name == "selu":
        # SELU's slope below 0 is y + scale*alpha, above 0 it is scale.
        return Gate(_SELU_SCALE * (DEAD_UNIT_SLOPE - _SELU_ALPHA), None)
    return None


def saturation_kind(layer):
    """Returns `"sigmoid"` or `"tanh"` for a layer whose output can saturate, else None."""
    return SATURATING.get(activation_name(layer))


def activation_layers(model, stats):
    """The layers whose activations a monitor measures, for the statistics asked for.

    Args:
        model: A Keras model, built or not.
        stats: Names of the statistics recorded.

    Returns:
        `(dead, saturation)`: a list of `(layer, Gate)` whose units can die
        (if `dead_fraction` is asked for), and a list of `(layer, kind)` that
        saturate (if `saturation_fraction` is).
    """
    dead, saturation = [], []
    for layer in walk_layers(model):
        gate, kind = dead_unit_gate(layer), saturation_kind(layer)
        if gate is not None and "dead_fraction" in stats:
            dead.append((layer, gate))
        elif kind is not None and "saturation_fraction" in stats:
            saturation.append((layer, kind))
    return dead, saturation
