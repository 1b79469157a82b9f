"""The model zoo's inputs (and its one model both backends build alike), shared by the TensorFlow and JAX zoo tests."""

import keras
import numpy as np

rng = np.random.RandomState(0)
IMAGES = rng.rand(32, 8, 8, 3).astype("float32")
SEQUENCES = rng.randn(32, 10, 4).astype("float32")
TOKENS = rng.randint(0, 50, size=(32, 6)).astype("int32")
LABELS = rng.randint(0, 3, size=(32,)).astype("int32")


def functional_residual():
    inputs = keras.Input((10, 4))
    x = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(inputs))
    x = keras.layers.Add()([x, keras.layers.Dense(16, activation="relu")(x)])
    return keras.Model(inputs, keras.layers.Dense(3)(x)), SEQUENCES
