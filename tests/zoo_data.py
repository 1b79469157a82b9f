"""The model zoo's inputs, shared by the TensorFlow and the JAX zoo tests so both train on the same data."""

import numpy as np

rng = np.random.RandomState(0)
IMAGES = rng.rand(32, 8, 8, 3).astype("float32")
SEQUENCES = rng.randn(32, 10, 4).astype("float32")
TOKENS = rng.randint(0, 50, size=(32, 6)).astype("int32")
LABELS = rng.randint(0, 3, size=(32,)).astype("int32")
