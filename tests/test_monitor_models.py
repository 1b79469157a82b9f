"""The monitor on the model zoo: each architecture records, and deterministic ones match a tape."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from zoo_data import IMAGES, LABELS, SEQUENCES, TOKENS, functional_residual, rng

import keras_vg

pytestmark = pytest.mark.fit



def conv_batchnorm():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ]), IMAGES


def lstm():
    return keras.Sequential([keras.Input((10, 4)), keras.layers.LSTM(8), keras.layers.Dense(3)]), SEQUENCES


def stacked_gru():
    return keras.Sequential([
        keras.Input((10, 4)), keras.layers.GRU(8, return_sequences=True), keras.layers.GRU(4),
        keras.layers.Dense(3),
    ]), SEQUENCES


def embedding():
    return keras.Sequential([
        keras.Input((6,), dtype="int32"), keras.layers.Embedding(50, 8),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3),
    ]), TOKENS


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(16, activation="relu", name="hidden")
        self.linear = keras.layers.Dense(16)
        self.act = keras.layers.ReLU(name="standalone_relu")
        self.out = keras.layers.Dense(3)

    def call(self, inputs):
        return self.out(self.act(self.linear(self.hidden(self.flatten(inputs)))))


def subclassed():
    model = Subclassed()
    model(SEQUENCES[:1])
    return model, SEQUENCES


def dropout_mlp():
    return keras.Sequential([
        keras.Input((10, 4)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.5), keras.layers.Dense(3),
    ]), SEQUENCES


DETERMINISTIC = [conv_batchnorm, lstm, stacked_gru, embedding, functional_residual, subclassed]


def first_step_reference(builder):
    """Step-0 gradient norms from our own GradientTape, on a twin of the model."""
    keras.utils.set_random_seed(0)
    model, x = builder()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=builder not in (conv_batchnorm,))
    with tf.GradientTape() as tape:
        loss = loss_fn(LABELS[:16], model(x[:16], training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    # DESIGN.md: sparse (IndexedSlices) gradients count their values only.
    return [float(tf.norm(g.values if isinstance(g, tf.IndexedSlices) else g)) for g in grads]


def fit_builder(builder, log_dir):
    keras.utils.set_random_seed(0)
    model, x = builder()
    from_logits = builder not in (conv_batchnorm,)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
    model.fit(x, LABELS, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras_vg.GradientMonitor(log_dir, every=1, verbose=0)])
    return model, keras_vg.read_run(log_dir)


@pytest.mark.parametrize("builder", DETERMINISTIC, ids=lambda b: b.__name__)
def test_zoo_model_first_step_matches_gradient_tape(builder, tmp_path):
    model, run = fit_builder(builder, tmp_path)
    steps, names, grad_norm = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, [0, 1])
    assert names == [v.path for v in model.trainable_variables]
    np.testing.assert_allclose(grad_norm[0], first_step_reference(builder), rtol=1e-5, atol=1e-8)
    assert np.all(np.isfinite(run.stat("update_ratio")[2][1]))


def test_dropout_model_records_every_variable(tmp_path):
    model, run = fit_builder(dropout_mlp, tmp_path)
    _, names, grad_norm = run.stat("grad_norm")
    assert names == [v.path for v in model.trainable_variables]
    assert np.all(np.isfinite(grad_norm)) and np.all(grad_norm > 0)


def test_activation_layers_are_found_in_subclassed_and_residual_models(tmp_path):
    _, run = fit_builder(subclassed, tmp_path / "sub")
    # A standalone activation layer's width is only known in the step: it is read there.
    assert run.stat("dead_fraction")[1] == ["hidden", "standalone_relu"]
    _, run = fit_builder(functional_residual, tmp_path / "res")
    assert len(run.stat("dead_fraction")[1]) == 2
    assert run.model()["has_residual_add"] is True


def test_keras_applications_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3, minimalistic=True, include_preprocessing=False
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = rng.rand(16, 32, 32, 3).astype("float32")
    model.fit(x, LABELS[:16], batch_size=8, epochs=1, verbose=0,
              callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    run = keras_vg.read_run(tmp_path)
    steps, names, grad_norm = run.stat("grad_norm")
    assert len(names) == len(model.trainable_variables) > 50
    assert np.all(np.isfinite(grad_norm))
    assert run.model()["has_batch_norm"] is True
    assert len(run.stat("dead_fraction")[1]) > 0
