"""The model zoo on Keras's JAX backend: every architecture records every variable, as jax.grad says."""

import jax
import keras
import numpy as np
import pytest
from zoo_data import IMAGES, LABELS, SEQUENCES, TOKENS, functional_residual

import keras_vg

pytestmark = pytest.mark.fit



def conv_batchnorm():
    return keras.Sequential([
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(3),
    ]), IMAGES


def lstm():
    return keras.Sequential([keras.layers.LSTM(8), keras.layers.Dense(3)]), SEQUENCES


def gru_stack():
    return keras.Sequential([keras.layers.GRU(8, return_sequences=True), keras.layers.GRU(4),
                             keras.layers.Dense(3)]), SEQUENCES


def embedding():
    return keras.Sequential([keras.layers.Embedding(50, 8), keras.layers.GlobalAveragePooling1D(),
                             keras.layers.Dense(3)]), TOKENS


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(16, activation="relu", name="hidden")
        self.act = keras.layers.ReLU(name="standalone_relu")
        self.out = keras.layers.Dense(3)

    def call(self, inputs, training=None):
        return self.out(self.act(self.hidden(self.flatten(inputs))))


def subclassed():
    return Subclassed(), SEQUENCES


ZOO = [conv_batchnorm, lstm, gru_stack, embedding, functional_residual, subclassed]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def first_step_reference(builder):
    """Step-0 gradient norms from jax.grad of the model's own stateless call, on a twin of the model."""
    keras.utils.set_random_seed(0)
    model, x = builder()
    model(x[:1])
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(values):
        prediction, _ = model.stateless_call(values, non_trainable, x[:16], training=True)
        return LOSS(LABELS[:16], prediction)

    return [float(np.linalg.norm(np.asarray(g))) for g in jax.grad(loss)(trainable)]


@pytest.mark.parametrize("builder", ZOO, ids=lambda b: b.__name__)
def test_zoo_model_first_step_matches_jax_grad(builder, tmp_path):
    keras.utils.set_random_seed(0)
    model, x = builder()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=LOSS)
    model.fit(x, LABELS, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    run = keras_vg.read_run(tmp_path)
    steps, names, grad_norm = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, [0, 1])
    assert names == [v.path for v in model.trainable_variables]
    np.testing.assert_allclose(grad_norm[0], first_step_reference(builder), rtol=1e-4, atol=1e-7)
    assert run.model() is not None and np.all(np.isfinite(run.stat("update_ratio")[2][1]))
    if builder is subclassed:
        assert run.stat("dead_fraction")[1] == ["hidden", "standalone_relu"]
