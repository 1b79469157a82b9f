"""keras.distribution on JAX: the records equal a single-device run on the same global batch.

DataParallel over two devices and over two processes, and ModelParallel with sharded kernels; in each,
AutoClip beside the monitor switches on at the same spike and clips the same steps.
"""

import os
import socket
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest

import keras_vg

pytestmark = pytest.mark.fit

BATCH = 32
STATS = ("grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "dead_fraction", "saturation_fraction",
         "global_grad_norm", "global_grad_norm_clipped", "clip_threshold", "clipped", "skipped")
SPIKE = 5
"""The step whose batch holds an outlier target: AutoClip switches on there."""


def data():
    rng = np.random.RandomState(0)
    x = rng.randn(8 * BATCH, 8).astype("float32")
    y = (x @ rng.randn(8, 1)).astype("float32")
    y[SPIKE * BATCH + 3] = 1e4
    return x, y


def callbacks(log_dir):
    return [keras_vg.GradientMonitor(log_dir, every=2, verbose=0), keras_vg.AutoClip(verbose=0)]


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def single_device_run(log_dir):
    keras.backend.clear_session()  # the layer names a fresh process gives
    keras.distribution.set_distribution(None)
    x, y = data()
    build().fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                callbacks=callbacks(log_dir))
    return keras_vg.read_run(log_dir)


def assert_same_records(run, reference):
    assert [(e["kind"], e["step"]) for e in run.events() if e["kind"] == "clip_on"] == [("clip_on", SPIKE)]
    for stat in STATS:
        steps, names, values = run.stat(stat)
        np.testing.assert_array_equal(steps, reference.stat(stat)[0], err_msg=stat)
        assert names == reference.stat(stat)[1]
        np.testing.assert_allclose(values, reference.stat(stat)[2], rtol=1e-5, atol=1e-7, err_msg=stat)


def test_data_parallel_over_two_devices_equals_one_device(tmp_path):
    assert len(jax.devices()) == 2, "tests/conftest.py asks XLA for two CPU devices"
    reference = single_device_run(tmp_path / "one")
    keras.backend.clear_session()
    try:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        x, y = data()
        build().fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                    callbacks=callbacks(tmp_path / "two"))
    finally:
        keras.distribution.set_distribution(None)
    assert_same_records(keras_vg.read_run(tmp_path / "two"), reference)


def test_model_parallel_with_sharded_kernels_equals_one_device(tmp_path):
    # Kernels and biases split over two devices along their units: XLA reduces across the shards.
    reference = single_device_run(tmp_path / "one")
    keras.backend.clear_session()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices=jax.devices())
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*/dense(_1)?/kernel"] = (None, "model")  # the hidden layers; the output has one unit
    layouts[".*/dense(_1)?/bias"] = ("model",)
    try:
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layouts,
                                                                             batch_dim_name="batch"))
        model = build()
        x, y = data()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=callbacks(tmp_path / "sharded"))
        assert "model" in str(model.layers[0].kernel.value.sharding.spec)  # really sharded
    finally:
        keras.distribution.set_distribution(None)
    assert_same_records(keras_vg.read_run(tmp_path / "sharded"), reference)


def test_data_parallel_over_two_processes_writes_the_global_records_once(tmp_path):
    # Two processes on loopback (jax.distributed with CPU collectives), one CPU device each.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    workers = [subprocess.Popen([sys.executable, os.path.join(here, "multiprocess_worker.py"), str(i), "2", port,
                                 str(tmp_path / "shared")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
    outputs = []
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        outputs.append(output)
        assert worker.returncode == 0, output[-3000:]
    assert all("trained 8 steps" in output for output in outputs)
    files = os.listdir(tmp_path / "shared")
    assert len(files) == 1, f"only process 0 writes: {files}"
    assert_same_records(keras_vg.read_run(tmp_path / "shared"), single_device_run(tmp_path / "one"))
