"""GradientMonitor's behaviour as users meet it: errors, warnings, files, resumes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import keras
import numpy as np
import pytest
from resume_callbacks import IterationsAtFirstBatch, StopAtEpoch

import keras_vg
from keras_vg import detect

pytestmark = pytest.mark.fit


def deep_mlp(activation, initializer, depth=10, width=32):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((16,))]
    layers += [keras.layers.Dense(width, activation=activation, kernel_initializer=initializer)
               for _ in range(depth)]
    layers.append(keras.layers.Dense(1, activation="sigmoid"))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    return model


def classification_data(n=512):
    rng = np.random.RandomState(0)
    x = rng.randn(n, 16).astype("float32")
    return x, (x[:, :1] + x[:, 1:2] > 0).astype("float32")


@pytest.mark.parametrize("kwargs,match", [
    ({"every": 0}, "`every` must be an integer >= 1. Received: every=0"),
    ({"every": 2.5}, "Received: every=2.5"),
    ({"stats": ["grad_norm", "gradnorm"]}, "`stats` must be a non-empty list drawn from"),
    ({"stats": "grad_norm"}, "not a string"),
    ({"stats": ["clipped"]}, "AutoClip records the clipping statistics"),
    ({"saturation_epsilon": 0.7}, "saturation_epsilon"),
    ({"verbose": 3}, "`verbose` must be 0 or 1"),
    ({"thresholds": {"vanishing_ratio": 1e-4}}, "`thresholds` must be a keras_vg.detect.Thresholds"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_vg.GradientMonitor(tmp_path, **kwargs)


def test_log_dir_that_is_a_file_fails(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="`log_dir` must be a directory"):
        keras_vg.GradientMonitor(path)


def test_vanishing_profile_of_deep_sigmoid_net_is_flagged_and_relu_he_is_not(tmp_path):
    x, y = classification_data()
    runs = {}
    for name, activation, init in [("sigmoid", "sigmoid", "glorot_uniform"), ("relu", "relu", "he_normal")]:
        model = deep_mlp(activation, init)
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False,
                  callbacks=[keras_vg.GradientMonitor(tmp_path / name, every=1, verbose=0)])
        runs[name] = keras_vg.read_run(tmp_path / name)
    steps, names, norms = runs["sigmoid"].stat("grad_norm")
    first, last = names.index(names[0]), names.index(names[-2])  # first and last kernels
    assert np.all(norms[:, first] / norms[:, last] < 1e-3)

    def vanishing_variables(run):
        classification = detect.classify({"grad_norm": run.stat("grad_norm")})
        return {classification.names[i] for i in np.nonzero((classification.codes == detect.VANISHING).any(0))[0]}

    assert names[0] in vanishing_variables(runs["sigmoid"])
    assert vanishing_variables(runs["relu"]) == set()


def test_dead_units_are_measured(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(32, activation="relu", kernel_initializer="he_normal", name="healthy"),
        keras.layers.Dense(32, activation="relu", bias_initializer=keras.initializers.Constant(-100.0),
                           name="dead"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="sgd", loss="mse")
    x, y = classification_data()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0,
              callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    steps, names, dead = keras_vg.read_run(tmp_path).stat("dead_fraction")
    assert names == ["healthy", "dead"]
    assert np.all(dead[:, 1] == 1.0)
    assert np.all(dead[:, 0] < 0.1)


def test_episode_warning_printed_once_and_summary_at_end(tmp_path, capsys):
    x, y = classification_data()
    model = deep_mlp("sigmoid", "glorot_uniform")
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[keras_vg.GradientMonitor(tmp_path, every=1)])
    err = capsys.readouterr().err
    warnings_printed = [line for line in err.splitlines() if line.startswith("keras-vg warning")]
    assert 1 <= len(warnings_printed) <= 3  # one per episode, not one per step (16 steps)
    assert "vanish" in err.lower()
    assert "keras-vg summary" in err
    assert any(e["kind"] == "alert" for e in keras_vg.read_run(tmp_path).events())


def test_beside_keras_tensorboard_in_the_same_log_dir(tmp_path):
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    x, y = classification_data(128)
    model = deep_mlp("relu", "he_normal", depth=2)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[
        keras.callbacks.TensorBoard(tmp_path, update_freq=1),
        keras_vg.GradientMonitor(tmp_path, every=1, verbose=0),
    ])
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    runs = multiplexer.Runs()
    assert "train" in runs and "." in runs
    assert "gradients/global_norm" in runs["."]["tensors"]
    assert "epoch_loss" in runs["train"]["tensors"]
    assert len(keras_vg.read_run(tmp_path).stat("grad_norm")[0]) == 8


def test_same_instance_two_fits_and_resumed_step_numbers(tmp_path):
    x, y = classification_data(128)
    model = deep_mlp("relu", "he_normal", depth=2)
    monitor = keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    np.testing.assert_array_equal(keras_vg.read_run(tmp_path).stat("grad_norm")[0], np.arange(8))
    assert monitor.tap.trace_count == 1


def test_backup_and_restore_continues_step_numbers(tmp_path):
    x, y = classification_data(128)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model = deep_mlp("relu", "he_normal", depth=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                  callbacks=[backup, keras_vg.GradientMonitor(tmp_path / "run", every=1, verbose=0), StopAtEpoch(2)])
    model = deep_mlp("relu", "he_normal", depth=2)  # a fresh process would start from scratch too
    first = IterationsAtFirstBatch()
    model.fit(x, y, batch_size=32, epochs=4, verbose=0,
              callbacks=[backup, first, keras_vg.GradientMonitor(tmp_path / "run", every=1, verbose=0)])
    assert first.value == 8  # restored from the checkpoint of epoch 1, not started again from 0
    steps = keras_vg.read_run(tmp_path / "run").stat("grad_norm")[0]
    np.testing.assert_array_equal(steps, np.arange(16))


class BypassingModel(keras.Model):
    """A custom train_step that updates weights without optimizer.apply."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((self(x) - y) ** 2)
        for variable, grad in zip(self.trainable_variables, tape.gradient(loss, self.trainable_variables)):
            variable.assign_sub(0.01 * grad)
        return {"loss": loss}


def test_train_step_without_optimizer_apply_warns_and_records_weight_norms(tmp_path):
    x, y = classification_data(128)
    model = BypassingModel()
    model.compile(optimizer="sgd")
    model(x[:1])
    probe = WeightNormsAtBatchBegin()
    with pytest.warns(UserWarning, match="saw no call to optimizer.apply"):
        model.fit(x, y, batch_size=32, epochs=2, verbose=0,
                  callbacks=[probe, keras_vg.GradientMonitor(tmp_path, every=2, verbose=0)])
    run = keras_vg.read_run(tmp_path)
    assert run.stats() == ["weight_norm"]
    steps, _, norms = run.stat("weight_norm")
    # From the first record step after the first step showed that the optimizer is bypassed.
    np.testing.assert_array_equal(steps, [2, 4, 6])
    # The weights before each record step's update, as the tap would record them.
    np.testing.assert_allclose(norms, np.array(probe.norms)[steps], rtol=1e-6)


class WeightNormsAtBatchBegin(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.norms = []

    def on_train_batch_begin(self, batch, logs=None):
        self.norms.append([np.linalg.norm(v.numpy()) for v in self.model.trainable_variables])


def test_monitor_failure_does_not_stop_training_and_keeps_records(tmp_path, monkeypatch):
    from keras_vg.event_writer import EventWriter

    x, y = classification_data(256)
    model = deep_mlp("relu", "he_normal", depth=2)
    original = EventWriter.write_record

    def failing_after_step_3(self, step, *args, **kwargs):
        if step > 3:
            raise OSError("disk full")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(EventWriter, "write_record", failing_after_step_3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=32, epochs=2, verbose=0,
                            callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    assert len(history.history["loss"]) == 2
    assert any("stopped recording" in str(w.message) and "disk full" in str(w.message) for w in caught)
    np.testing.assert_array_equal(keras_vg.read_run(tmp_path).stat("grad_norm")[0], np.arange(4))


CHILD = textwrap.dedent("""
    import sys, time
    import keras, numpy as np
    import keras_vg

    class Report(keras.callbacks.Callback):
        step = 0
        def on_train_batch_end(self, batch, logs=None):
            print(f"{time.time()} {Report.step}", flush=True)
            Report.step += 1
            time.sleep(0.02)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.randn(64, 4).astype("float32")
    y = np.random.randn(64, 1).astype("float32")
    monitor = keras_vg.GradientMonitor(sys.argv[1], every=1, flush_secs=1, verbose=0)
    model.fit(x, y, batch_size=8, epochs=100000, verbose=0, callbacks=[monitor, Report()])
""")


def test_sigkill_mid_run_keeps_everything_up_to_the_last_flush(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    reports = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            reports.append([float(v) for v in line.split()])
            if reports[-1][1] >= 150:
                break
        killed_at = time.time()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert reports and reports[-1][1] >= 150, "the child did not train far enough"
    # Everything recorded more than a read interval (1 s), flush_secs (1 s) and 1 s of slack before the kill is on disk.
    must_have = max(int(step) for t, step in reports if t < killed_at - 3.0)
    steps = keras_vg.read_run(tmp_path / "run").stat("grad_norm")[0]
    assert steps.max() >= must_have
    np.testing.assert_array_equal(steps, np.arange(len(steps)))


def test_close_removes_every_wrapper_and_keeps_keras_own_function(tmp_path):
    x, y = classification_data(128)
    model = deep_mlp("relu", "he_normal", depth=2)
    monitor = keras_vg.GradientMonitor(tmp_path, every=2, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    keras_function = model.train_function
    wrapped_layers = [layer for layer in model.layers if "call" in layer.__dict__]
    assert "apply" in model.optimizer.__dict__ and wrapped_layers
    assert keras_function is monitor._plain and keras_function is not monitor._instrumented
    monitor.close()
    monitor.close()  # harmless twice
    assert "apply" not in model.optimizer.__dict__ and "train_step" not in model.__dict__
    assert not [layer for layer in model.layers if "call" in layer.__dict__]
    # Keras's own function holds no op of ours (the wrappers passed through when it was traced): it stays.
    assert model.train_function is keras_function
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # runs as plain Keras


def test_model_without_trainable_variables_warns_once_and_training_goes_on(tmp_path):
    x, y = classification_data(64)
    model = keras.Sequential([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                            callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    ours = [w for w in caught if "keras-vg" in str(w.message) or "GradientMonitor" in str(w.message)
            or "no trainable variables" in str(w.message)]
    assert len(history.history["loss"]) == 2
    assert [str(w.message) for w in ours] == ["The model has no trainable variables; GradientMonitor records nothing."]


def test_a_log_dir_holding_another_models_records_is_continued_with_a_warning(tmp_path):
    x, y = classification_data(64)
    model = deep_mlp("relu", "he_normal", depth=2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[keras_vg.GradientMonitor(tmp_path, every=1,
                                                                                            verbose=0)])
    other = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1, name="single")])
    other.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match="already holds records of another model.*continue its step axis at step 4"):
        other.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[keras_vg.GradientMonitor(tmp_path, every=1,
                                                                                                verbose=0)])
    steps, names, values = keras_vg.read_run(tmp_path).stat("grad_norm")
    np.testing.assert_array_equal(steps, np.arange(8))  # nothing recorded before was written over
    assert len(names) == len(model.trainable_variables) + 2
    assert np.all(np.isnan(values[4:, :len(model.trainable_variables)]))


@pytest.mark.parametrize("nan_step,reported", [
    (5, (5, 8)),  # between two records: the record at step 8 notes that the loss is no longer finite
    (14, (13, 15)),  # after the epoch's last record (12): the epoch's end finds it
])
def test_loss_that_turns_nan_between_records_is_reported_with_its_step_range(nan_step, reported, tmp_path, capsys):
    x, y = classification_data(256)
    y = y.copy()
    y[nan_step * 16 + 3] = np.nan  # not a recorded step with every=4
    model = deep_mlp("relu", "he_normal", depth=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras_vg.GradientMonitor(tmp_path, every=4, stats=["grad_norm"])])
    run = keras_vg.read_run(tmp_path)
    nonfinite = [e for e in run.events() if e["kind"] == "nonfinite"]
    assert nonfinite[0]["source"] == "loss"
    assert (nonfinite[0]["step"], nonfinite[0]["last_step"]) == reported
    assert "The loss became NaN or infinite between steps" in capsys.readouterr().err


def test_model_compiled_without_a_keras_optimizer_warns_and_trains(tmp_path):
    # A custom train_step that updates the weights itself needs no optimizer; the monitor has no step to tap.
    x, y = classification_data(128)
    model = BypassingModel()
    model.compile(optimizer=None)
    with pytest.warns(UserWarning, match=r"GradientMonitor needs a Keras optimizer .* Received: NoneType"):
        history = model.fit(x, y, batch_size=32, epochs=1, verbose=0,
                            callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    assert len(history.history["loss"]) == 1
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)  # no empty event file either


def test_a_backend_without_a_tap_gets_one_warning_and_training_goes_on(tmp_path, monkeypatch):
    # The torch backend has no tap: seen as Keras would report it, on this process's TensorFlow model.
    x, y = classification_data(64)
    model = deep_mlp("relu", "he_normal", depth=1)
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.warns(UserWarning, match="the 'torch' backend is not supported. Nothing is recorded") as caught:
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                            callbacks=[keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)])
    assert len([w for w in caught if "GradientMonitor" in str(w.message)]) == 1
    assert len(history.history["loss"]) == 1 and not os.listdir(tmp_path)
