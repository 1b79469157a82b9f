"""What each activation does to gradients, by name. Standard library only.

The names are those `keras_vg.layers.activation_name` gives and the model
summary records. They live here, apart from `keras_vg.layers` (which reads
live Keras layers and so imports Keras), because the report and the region
rules judge a run from its files, in a process that never loads TensorFlow.

Example:

>>> sorted(SATURATING)
['hard_sigmoid', 'hard_tanh', 'sigmoid', 'tanh']
>>> "gelu" in RELU_FAMILY, "gelu" in NEVER_DEAD
(True, False)
"""

RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "selu", "prelu", "silu", "swish", "gelu"})
"""Piecewise-linear activations and their smooth variants, the usual remedy for saturation."""

SATURATING = {"sigmoid": "sigmoid", "hard_sigmoid": "sigmoid", "tanh": "tanh", "hard_tanh": "tanh"}
"""Activations with two asymptotes, by the kind of range they saturate in (`keras_vg.stats.saturated_count`)."""

NEVER_DEAD = frozenset({"leaky_relu", "prelu"})
"""Activations whose negative side keeps a slope: their units always pass gradient."""
