"""AutoClip on Keras's JAX backend (issue 16's minimum): one warning, then nothing; `fit` never breaks.

AutoClip's hooks live in TensorFlow's train step. On JAX they cannot act yet,
so AutoClip must say so once, naming the backend, and leave training exactly
as it would be without it: no crash (it used to raise, or fail with
`AttributeError: ... distribute_strategy`). That it imports no TensorFlow
is checked with the monitor's, in a fresh process (test_jax_monitor.py).

Run with `KERAS_BACKEND=jax`: see tests/conftest.py.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_vg

pytestmark = pytest.mark.fit

BATCH = 32
rng = np.random.RandomState(0)
X = rng.randn(6 * BATCH, 8).astype("float32")
Y = (X @ rng.randn(8, 1)).astype("float32")


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def test_autoclip_warns_once_naming_the_backend_and_changes_nothing(tmp_path):
    plain = build()
    plain.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    model = build()
    clip = keras_vg.AutoClip(log_dir=tmp_path / "clip")
    monitor = keras_vg.GradientMonitor(tmp_path / "run", every=1, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second fit with the same callback: still one warning
            history = model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                                callbacks=[clip, monitor])
    messages = [str(w.message) for w in caught if "AutoClip" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'jax' backend is not supported" in messages[0] and "Training goes on" in messages[0]
    assert np.isfinite(history.history["loss"]).all() and not model.stop_training
    for a, b in zip(model.weights, plain.weights):  # training exactly as without AutoClip
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert not clip.active and clip.read_new() == [] and clip.drain_events() == []
    # The monitor still records, and nothing of AutoClip's reached its run or a run of its own.
    run = keras_vg.read_run(tmp_path / "run")
    np.testing.assert_array_equal(run.stat("grad_norm")[0], np.arange(12))
    assert "clipped" not in run.stats() and not (tmp_path / "clip").exists()
    clip.close()

