"""Shared test set-up.

One pytest process runs one Keras backend, chosen by `KERAS_BACKEND` before
Keras is imported: the default (TensorFlow) runs every test but those in
`tests/jax/`, and `KERAS_BACKEND=jax` runs those alone (`make test` runs
both).

MirroredStrategy tests need two logical CPU devices, which TensorFlow only
accepts before it first initialises its devices: hence at import time here.
JAX's data-parallel tests need two CPU devices too, which XLA makes when
told before JAX starts.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    collect_ignore_glob = ["test_*.py"]  # the TensorFlow suite
else:
    collect_ignore = ["jax"]

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _configure_two_cpus():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
    except RuntimeError:
        pass  # already initialised by an earlier import; the strategy tests then skip


if BACKEND == "tensorflow":
    _configure_two_cpus()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    import keras

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


@pytest.fixture(scope="session")
def two_cpu_strategy():
    """One MirroredStrategy over two logical CPUs for the whole session.

    A second MirroredStrategy in the same process can reuse the first one's
    collective instance keys and fail with "Shape mismatch in the collective
    instance" once the models differ (tensorflow#62790, TF 2.21).
    """
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.fail("tests/conftest.py should have configured two logical CPU devices")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


@pytest.fixture
def regression_data():
    rng = np.random.RandomState(0)
    x = rng.randn(256, 8).astype("float32")
    y = (x @ rng.randn(8, 1)).astype("float32")
    return x, y
