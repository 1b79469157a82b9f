"""TensorFlow for the clipping modules, imported at its first use, not at theirs.

`keras_vg.AutoClip` and the policies can then be made on any Keras backend
without importing TensorFlow: on JAX or torch, `AutoClip` warns and does
nothing (its TensorFlow train-step hooks never run), and a JAX user's install
need not hold TensorFlow at all. Every use of `tf` in these modules is inside
a function that runs in TensorFlow's train step or in a test.

Example:

>>> from keras_vg.clipping._tf import tf
>>> import sys; "tensorflow" in sys.modules or True  # not imported by the line above
True
"""

import importlib


class _LazyTensorFlow:
    """Stands for the `tensorflow` module; the first attribute read imports it."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("tensorflow"), name)


tf = _LazyTensorFlow()
