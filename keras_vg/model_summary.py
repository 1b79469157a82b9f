"""A small, JSON-ready description of a model's architecture.

The diagnosis picks remedies from it (no BatchNorm advice for a model that has
BatchNorm, gating for a SimpleRNN), and `keras_vg.detect` reads the structure
its rules need from it: which layer each variable belongs to and its role
(kernels carry the verdicts), the model's output layers, and the gradients
that are zero by construction. It records exactly what those choices need,
read from public attributes in one pass over the layers.
"""

import keras

from keras_vg.detect import variable_role
from keras_vg.layers import activation_name, walk_layers

NORMALIZATIONS = frozenset({"BatchNormalization", "LayerNormalization", "GroupNormalization"})


def _initializer_name(layer, attribute="kernel_initializer"):
    initializer = getattr(layer, attribute, None)
    if initializer is None:
        return None
    return type(initializer).__name__


def _tensors(value):
    """The tensors in a layer's `input` or `output` (a tensor, or a list or dict of them)."""
    if isinstance(value, dict):
        value = list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _connections(model, layers):
    """`(inbound, outputs)`: each layer's inbound layer names, and the layers the model outputs.

    Read from the symbolic graph of functional and Sequential models, by the
    identity of each layer's `input` and `output` tensors. A layer with no
    such graph (a subclassed model's, or one called several times) gets
    None: unknown, which is not "none".
    """
    producer, inputs = {}, {}
    for layer in layers:
        try:
            outputs, incoming = _tensors(layer.output), _tensors(layer.input)
        except (AttributeError, ValueError):  # never called symbolically, or called more than once
            continue
        for tensor in outputs:
            producer[id(tensor)] = layer.name
        inputs[layer.name] = incoming
    inbound = {}
    for name, incoming in inputs.items():
        inbound[name] = [producer[id(t)] for t in incoming if id(t) in producer and producer[id(t)] != name]
    try:
        model_outputs = _tensors(model.outputs)
    except (AttributeError, ValueError):
        model_outputs = []
    outputs = [producer[id(t)] for t in model_outputs if id(t) in producer]
    return inbound, outputs


def _removed_by_batch_norm(layer, followers):
    """Whether every layer fed by `layer` is a BatchNormalization over its bias's axis.

    BatchNormalization subtracts each channel's batch mean, so a constant
    added to a channel before it (the bias) leaves the output unchanged: its
    gradient is 0 by construction. An activation in between breaks this.
    """
    if not followers or activation_name(layer) not in (None, "linear"):
        return False
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    for follower in followers:
        if type(follower).__name__ != "BatchNormalization":
            return False
        axis = follower.axis[0] if isinstance(follower.axis, (list, tuple)) else follower.axis
        rank = len(follower.input.shape)
        if (axis % rank) != (1 if channels_first else rank - 1):
            return False
    return True


def _structural_zeros(layers, inbound, outputs):
    """Variables whose gradient is zero by construction, with the reason."""
    by_name = {layer.name: layer for layer in layers}
    consumers = {}
    for name, sources in inbound.items():
        for source in sources:
            consumers.setdefault(source, []).append(by_name[name])
    zeros = []
    for layer in layers:
        bias = getattr(layer, "bias", None)
        if (bias is not None and getattr(bias, "trainable", False) and layer.name not in outputs
                and layer.name in consumers and _removed_by_batch_norm(layer, consumers[layer.name])):
            zeros.append({"variable": bias.path, "layer": layer.name, "reason": "batch_norm_follows",
                          "by": consumers[layer.name][0].name})
        if type(layer).__name__ == "MultiHeadAttention":
            # softmax(q . (k + b)) = softmax(q . k): q . b is the same for every key of a query.
            for variable in layer.trainable_variables:
                if variable.path.endswith("/key/bias"):
                    zeros.append({"variable": variable.path, "layer": layer.name,
                                  "reason": "attention_key_bias", "by": layer.name})
    return zeros


def _bias_constant(layer):
    """The value of a `Constant` bias initialiser (e.g. -2.0), or None."""
    initializer = getattr(layer, "bias_initializer", None)
    if type(initializer).__name__ != "Constant":
        return None
    try:
        return float(initializer.get_config()["value"])
    except (KeyError, TypeError, ValueError):
        return None


def _optimizer_clipping(optimizer):
    """The optimizer's own clipping arguments that are set, e.g. `{"global_clipnorm": 1.0}`."""
    settings = {}
    for name in ("clipnorm", "global_clipnorm", "clipvalue"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float)):
            settings[name] = float(value)
    return settings


def summarize_model(model):
    """Describes a model's layers for the diagnosis and the detection rules.

    Args:
        model: A built Keras model.

    Returns:
        A dict with `name`, `optimizer`, `keras_version`, and `layers`: a
        list, in model order, of dicts with `name`, `class`, `activation`,
        `kernel_initializer`, `variables` (their paths), `roles` (one per
        variable: `kernel`, `bias`, `scale`, `offset` or `vector`, see
        `keras_vg.detect.variable_role`), `inbound` (the names of the layers
        feeding it, or None where the graph is unknown) and, for a `Constant`
        bias initialiser, `bias_constant`. Then `outputs` (the layers whose
        outputs the model returns), `structural_zeros` (variables whose
        gradient is zero by construction: dicts with `variable`, `layer`,
        `reason` (`batch_norm_follows` or `attention_key_bias`) and `by`, the
        layer that removes it), `optimizer_clipping` (the optimizer's own
        `clipnorm`, `global_clipnorm` or `clipvalue` where set), and the
        flags `has_batch_norm`,
        `has_residual_add` and `recurrent` (class names).

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=True),
    ...                           keras.layers.BatchNormalization()])
    >>> summary = summarize_model(model)
    >>> summary["layers"][0]["roles"], summary["structural_zeros"][0]["reason"]
    (['kernel', 'bias'], 'batch_norm_follows')
    """
    leaves = list(walk_layers(model))
    inbound, outputs = _connections(model, leaves)
    layers = []
    for layer in leaves:
        variables = layer.trainable_variables
        entry = {
            "name": layer.name,
            "class": type(layer).__name__,
            "activation": activation_name(layer),
            "kernel_initializer": _initializer_name(layer),
            "variables": [v.path for v in variables],
            "roles": [variable_role(v.path, len(v.shape)) for v in variables],
            "inbound": inbound.get(layer.name),
        }
        constant = _bias_constant(layer)
        if constant is not None:
            entry["bias_constant"] = constant
        layers.append(entry)
    classes = {entry["class"] for entry in layers}
    optimizer = getattr(model, "optimizer", None)
    return {
        "name": model.name,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "optimizer_clipping": _optimizer_clipping(optimizer),
        "layers": layers,
        "outputs": outputs,
        "structural_zeros": _structural_zeros(leaves, inbound, outputs),
        "has_batch_norm": bool(classes & NORMALIZATIONS),
        "has_residual_add": "Add" in classes,
        "recurrent": sorted(
            entry["class"] for entry in layers
            if entry["class"] in {"SimpleRNN", "LSTM", "GRU", "RNN", "Bidirectional"}
        ),
        "keras_version": keras.__version__,
    }
