"""keras-vg: see vanishing and exploding gradients while a Keras model trains.

The public names are loaded on first use, so that `import keras_vg.format` (as
the TensorBoard plugin does) never imports TensorFlow.

Example:

```python
import keras_vg
monitor = keras_vg.GradientMonitor(log_dir="logs/run1", every=10)
model.fit(x, y, epochs=5, callbacks=[monitor])
steps, names, values = keras_vg.read_run("logs/run1").stat("grad_norm")
```
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GradientMonitor": "keras_vg.monitor",
    "read_run": "keras_vg.reader",
    "Run": "keras_vg.reader",
    "FormatError": "keras_vg.format",
    "STATS": "keras_vg.format",
    "AutoClip": "keras_vg.clipping",
    "ZScore": "keras_vg.clipping",
    "Percentile": "keras_vg.clipping",
    "AGC": "keras_vg.clipping",
    "GlobalNorm": "keras_vg.clipping",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keras_vg' has no attribute {name!r}")


def __dir__():
    return __all__
