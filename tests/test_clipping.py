"""AutoClip inside `fit`: rescue, skipping, distribution, compilation modes, checkpoints, records."""

import os
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from rescue_cases import check_smallest_rescue_cases

import keras_vg
from keras_vg import _keras_compat
from keras_vg.run_log import RunLog

pytestmark = pytest.mark.fit

BATCH = 32


def regression(batches=12, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(BATCH * batches, 8).astype("float32")
    y = (x @ rng.randn(8, 1)).astype("float32")
    return x, y


def build(optimizer=lambda: keras.optimizers.SGD(0.01), strategy=None, **compile_kwargs):
    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1, dtype="float32"),
        ])
        model.compile(optimizer=optimizer(), loss="mse", **compile_kwargs)
        return model

    if strategy is None:
        return make()
    with strategy.scope():
        return make()


def fit(model, x, y, callbacks, epochs=1, **kwargs):
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)


def snapshot(model):
    optimizer = model.optimizer
    return {v.path: v.numpy().copy() for v in list(model.weights) + list(optimizer.variables)}


# Rescue ------------------------------------------------------------------------------------


def curriculum_data(seed):
    """40 batches of short sequences (10 steps, pre-padded with zeros), then 24 batches of 80 steps.

    The target is the last input plus half the one before. A linear RNN whose
    recurrent matrix has gain 1.1 multiplies a gradient by up to 1.1**80 ≈
    2000 through a long sequence: the first long batch (step 40, after
    ZClip's 25 warm-up steps) is an explosion of about 1e5 times the usual norm.
    """
    rng = np.random.RandomState(seed)
    x = rng.randn(64 * BATCH, 80, 1).astype("float32")
    x[: 40 * BATCH, :70] = 0.0
    return x, (x[:, -1] + 0.5 * x[:, -2]).astype("float32")


def recurrent_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((80, 1)),
        keras.layers.SimpleRNN(8, activation="linear", use_bias=False,
                               recurrent_initializer=keras.initializers.Orthogonal(gain=1.1)),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.005), loss="mse")
    return model


def test_autoclip_rescues_an_exploding_rnn():
    x, y = curriculum_data(seed=0)
    plain = recurrent_model(seed=0)
    fit(plain, x, y, [], epochs=2)
    plain_loss = plain.evaluate(x, y, verbose=0)
    assert not np.isfinite(plain_loss) or plain_loss > 1e3

    clipped = recurrent_model(seed=0)
    clip = keras_vg.AutoClip(verbose=0)  # the defaults: ZScore, armed
    fit(clipped, x, y, [clip], epochs=2)
    clipped_loss = clipped.evaluate(x, y, verbose=0)
    assert clipped_loss < 0.2  # predicting 0 scores 1.25
    events = clip.drain_events()
    assert events[0]["kind"] == "clip_on" and events[0]["step"] == 40
    records = dict(clip.read_new())
    assert records[40]["global_grad_norm"] > 1e3 * records[39]["global_grad_norm"]
    # After clipping the norm is at most the threshold, on every clipped step.
    for step, values in records.items():
        if values["clipped"]:
            assert values["global_grad_norm_clipped"] <= values["clip_threshold"] * (1 + 1e-6), step
        else:
            assert values["global_grad_norm_clipped"] == values["global_grad_norm"]


def test_rescue_benchmark_smallest_cases():
    """The rescue benchmark's targets on its fastest models, one epoch each (docs/CLIPPING.md has all of them)."""
    check_smallest_rescue_cases()


# Skipping non-finite steps -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["function", "jit", "mirrored"])
def test_nonfinite_step_leaves_weights_and_optimizer_bit_identical(mode, two_cpu_strategy):
    x, y = regression(batches=4)
    x[2 * BATCH + 5] = np.nan  # batch 2: a NaN gradient
    strategy = two_cpu_strategy if mode == "mirrored" else None
    model = build(lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1), strategy=strategy,
                  jit_compile=(mode == "jit"))
    clip = keras_vg.AutoClip(verbose=0)
    masked = []
    spy = _keras_compat._masked_writes
    with mock.patch.object(_keras_compat, "_masked_writes", lambda *a: masked.append(1) or spy(*a)):
        fit(model, x[: 2 * BATCH], y[: 2 * BATCH], [clip])
        # A weight of -0.0, which a masked write adding +0.0 would turn into +0.0.
        bias = model.layers[0].bias
        bias.assign(np.where(np.arange(bias.shape[0]) == 0, -0.0, bias.numpy()).astype("float32"))
        before = snapshot(model)
        fit(model, x[2 * BATCH: 3 * BATCH], y[2 * BATCH: 3 * BATCH], [clip])
    # Under XLA the skip selects old values in each write; elsewhere it branches around the update.
    assert bool(masked) == (mode == "jit")
    after = snapshot(model)
    iterations = model.optimizer.iterations.path
    for path in before:
        if path == iterations:
            # A skipped step still counts: every batch keeps its own step number.
            assert after[path] == before[path] + 1
        else:
            assert after[path].tobytes() == before[path].tobytes(), path  # bit for bit
    assert [(e["kind"], e["step"]) for e in clip.drain_events()] == [("clip_on", 2), ("skip", 2)]
    fit(model, x[3 * BATCH:], y[3 * BATCH:], [clip])
    assert not np.array_equal(snapshot(model)[model.weights[0].path], before[model.weights[0].path])


def test_nonfinite_step_is_applied_when_skipping_is_off():
    x, y = regression(batches=2)
    x[BATCH + 1] = np.nan
    model = build()
    fit(model, x, y, [keras_vg.AutoClip(keras_vg.ZScore(skip_nonfinite=False), verbose=0)])
    assert np.isnan(model.weights[0].numpy()).any()


# No silent dead end ------------------------------------------------------------------------


class SpoilWeights(keras.callbacks.Callback):
    """Fills the first kernel with NaN before batch `batch`: every later gradient is NaN, and skipping cannot help."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            kernel = self.model.layers[0].kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def test_nonfinite_weights_stop_training_with_a_message():
    x, y = regression(batches=200)
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    with pytest.warns(UserWarning, match=r"AutoClip stopped training at step \d+: `sequential/dense/kernel` holds "
                                         r"NaN or inf, so skipping non-finite steps cannot help\. The last good step "
                                         r"was 4; .*Try: restore the weights saved before step 5"):
        fit(model, x, y, [clip, SpoilWeights(batch=5)])
    assert model.stop_training
    stopped = int(model.optimizer.iterations.numpy())
    # Checked on the host every 32 steps (or second): stopped soon after, not at the end of the 200 steps.
    assert 6 <= stopped <= 5 + 33
    assert clip.stopped["step"] == stopped - 1 and clip.stopped["last_good"] == 4  # the last step trained
    assert clip.state()["skip_run"] == stopped - 5


def test_skipped_steps_in_a_row_stop_training(tmp_path):
    x, y = regression(batches=200)
    x[3 * BATCH:] = np.nan  # from step 3 on, every batch holds a NaN: the weights stay finite, nothing learns
    model = build()
    clip = keras_vg.AutoClip(log_dir=tmp_path, skip_patience=10, verbose=0)
    with pytest.warns(UserWarning, match=r"steps in a row were skipped \(skip_patience=10\)\. The last good step "
                                         r"was 2"):
        fit(model, x, y, [clip])
    stopped = int(model.optimizer.iterations.numpy())
    # The dead end is step 12 (ten skipped in a row from step 3); the host checks every 32 steps, or sooner
    # when a second has passed, so a check may fall between and the stop comes within 32 steps of it.
    assert 3 + 10 <= stopped <= 3 + 10 + 32
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)  # skipping kept them finite
    # The stop is in the run, as a warning at the step it happened.
    [warning] = [e for e in keras_vg.read_run(tmp_path).events() if e["kind"] == "warning"]
    assert warning["step"] == stopped - 1 and "AutoClip stopped training" in warning["message"]


def test_no_stop_without_skips_and_a_new_fit_starts_afresh():
    x, y = regression(batches=40)
    x[5 * BATCH] = np.nan  # one NaN batch: skipped, the weights are fine
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [clip], epochs=2)
    assert clip.stopped is None and not model.stop_training
    assert int(model.optimizer.iterations.numpy()) == 80 and clip.state()["skipped"] == 2


# Distribution and compilation modes --------------------------------------------------------


def clip_every_step():
    return keras_vg.AutoClip(keras_vg.GlobalNorm(0.5), trigger=None, verbose=0)


def test_mirrored_clips_the_summed_gradient_like_one_device(two_cpu_strategy):
    x, y = regression(batches=6)
    single = build()
    single_clip = clip_every_step()
    fit(single, x, y, [single_clip])
    mirrored = build(strategy=two_cpu_strategy)
    mirrored_clip = clip_every_step()
    fit(mirrored, x, y, [mirrored_clip])
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7)
    single_records, mirrored_records = single_clip.read_new(), mirrored_clip.read_new()
    assert [s for s, _ in mirrored_records] == list(range(6))
    for (_, a), (_, b) in zip(single_records, mirrored_records):
        assert b["clipped"] == a["clipped"] == 1.0
        np.testing.assert_allclose(b["global_grad_norm"], a["global_grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(b["global_grad_norm_clipped"], 0.5, rtol=1e-6)

    # Keras's own global_clipnorm clips each replica's half before the sum (tensorflow#33929).
    keras_clipped = build(lambda: keras.optimizers.SGD(0.01, global_clipnorm=0.5), strategy=two_cpu_strategy)
    fit(keras_clipped, x, y, [])
    assert not np.allclose(keras_clipped.weights[0].numpy(), single.weights[0].numpy(), rtol=1e-3)


@pytest.mark.parametrize("kwargs", [{"jit_compile": True}, {"steps_per_execution": 3}, {"run_eagerly": True}],
                         ids=["jit", "steps_per_execution", "eager"])
def test_compilation_modes_match_tf_function(kwargs):
    x, y = regression(batches=6)
    x[4 * BATCH: 5 * BATCH] *= 50.0  # a spike at step 4: for the z-score trigger, not for the guard's 10x
    reference = build()
    reference_clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=3), trigger=keras_vg.ZScore(warmup=3), verbose=0)
    fit(reference, x, y, [reference_clip])
    model = build(**kwargs)
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=3), trigger=keras_vg.ZScore(warmup=3), verbose=0)
    fit(model, x, y, [clip])
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7)
    records, expected = clip.read_new(), reference_clip.read_new()
    assert [s for s, _ in records] == [s for s, _ in expected] == list(range(6))
    # On at the spike (step 4); with SGD, step 5 is then held to the guard's update-ratio cap.
    assert [v["clipped"] for _, v in records] == [v["clipped"] for _, v in expected] == [0, 0, 0, 0, 1, 1]
    for (_, a), (_, b) in zip(expected, records):
        np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-5)
    assert [e["kind"] for e in clip.drain_events()] == ["clip_on"]


@pytest.mark.parametrize("policy", [lambda: keras_vg.GlobalNorm(0.5), lambda: keras_vg.Percentile(p=50),
                                    lambda: keras_vg.AGC(0.001)], ids=["global_norm", "percentile", "agc"])
def test_every_policy_clips_under_xla_as_under_tf_function(policy):
    x, y = regression(batches=6)
    runs = {}
    for jit_compile in (False, True):
        model = build(jit_compile=jit_compile)
        # No trigger: the policy decides (and clips) from the first step, so the clip branch runs.
        clip = keras_vg.AutoClip(policy(), trigger=None, verbose=0)
        fit(model, x, y, [clip])
        runs[jit_compile] = model, clip.read_new()
    (reference, expected), (model, records) = runs[False], runs[True]
    assert sum(v["clipped"] for _, v in records) >= 1
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7)
    for (_, a), (_, b) in zip(expected, records):
        np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-5)


def test_mixed_float16_clips_the_unscaled_gradient():
    x, y = regression(batches=3)
    reference = build()
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:BATCH], reference(x[:BATCH]))
        loss = tf.reduce_mean(loss)
    reference_norm = float(tf.linalg.global_norm(tape.gradient(loss, reference.trainable_variables)))

    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    clip = keras_vg.AutoClip(keras_vg.GlobalNorm(0.1), trigger=None, verbose=0)
    fit(model, x, y, [clip])
    records = clip.read_new()
    assert [s for s, _ in records] == [0, 1, 2]
    # A scaled gradient would be 32768 times larger.
    np.testing.assert_allclose(records[0][1]["global_grad_norm"], reference_norm, rtol=2e-2)
    assert all(v["global_grad_norm_clipped"] == pytest.approx(0.1, rel=1e-5) for _, v in records)


def test_agc_in_fit_clips_unit_wise_and_spares_the_output_layer():
    x, y = regression(batches=1)
    model = build(lambda: keras.optimizers.SGD(0.1))
    weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.mean_squared_error(y, model(x)))
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
    # AGC alone, as optax computes it: without the guard's SGD cap on top.
    clip = keras_vg.AutoClip(keras_vg.AGC(clip_factor=0.01), trigger=None, clip_update_ratio=None, verbose=0)
    fit(model, x, y, [clip])
    for index, (variable, w, g) in enumerate(zip(model.trainable_variables, weights, grads)):
        if index < 2:  # the hidden layer, unit-wise (AGC, as optax computes it)
            norms_axes = (0,) if g.ndim == 2 else None
            g_norm = np.sqrt(np.sum(g * g, axis=norms_axes, keepdims=norms_axes is not None))
            limit = 0.01 * np.maximum(np.sqrt(np.sum(w * w, axis=norms_axes, keepdims=norms_axes is not None)), 1e-3)
            assert np.any(g_norm > limit)
            g = np.where(g_norm < limit, g, g * limit / g_norm)
        np.testing.assert_allclose(variable.numpy(), w - 0.1 * g, rtol=1e-5, atol=1e-7, err_msg=variable.path)
    (step, values), = clip.read_new()
    # AGC has no global threshold: what is recorded is the guard's (nothing seen yet: its ceiling).
    assert values["clipped"] == 1.0 and values["clip_threshold"] == np.float32(keras_vg.clipping.MAX_NORM)


# Switching without retracing ----------------------------------------------------------------


def test_switching_on_and_off_does_not_retrace():
    x, y = regression(batches=16)
    y[8 * BATCH: 9 * BATCH] *= 100.0  # a spike at step 8
    model = build(steps_per_execution=2)
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), cooldown=3, verbose=0)
    fit(model, x, y, [clip])
    fit(model, x, y, [clip])  # a second fit reuses the traced function
    assert clip.trace_count == 1
    events = [(e["kind"], e["step"]) for e in clip.drain_events()]
    assert events[:2] == [("clip_on", 8), ("clip_off", 11)]
    assert not clip.active


@pytest.mark.parametrize("policy", [keras_vg.GlobalNorm(1e-3), keras_vg.AGC(clip_factor=1e-6)],
                         ids=["global_norm", "agc"])
def test_armed_policy_clips_nothing_until_a_spike(policy):
    x, y = regression(batches=12)
    y[10 * BATCH: 11 * BATCH] *= 100.0
    model = build()
    # Both policies would clip every step: armed, they clip nothing until the trigger's spike.
    clip = keras_vg.AutoClip(policy, trigger=keras_vg.ZScore(warmup=4), verbose=0)
    fit(model, x, y, [clip])
    records = clip.read_new()
    assert [int(v["clipped"]) for _, v in records] == [0] * 10 + [1, 1]
    # (AGC leaves the output layer alone, which carries most of this norm.)
    assert all(v["global_grad_norm_clipped"] < v["global_grad_norm"] for _, v in records[10:])


# Conflicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_optimizer_that_clips_already_is_refused(argument):
    x, y = regression(batches=1)
    model = build(lambda: keras.optimizers.SGD(0.01, **{argument: 1.0}))
    with pytest.raises(ValueError, match=f"Remove `{argument}` from the optimizer. Received: {argument}=1.0"):
        fit(model, x, y, [keras_vg.AutoClip(verbose=0)])


# Checkpoints --------------------------------------------------------------------------------


class StopInEpoch(keras.callbacks.Callback):
    """Interrupts training, as a crash would, at a batch of an epoch."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self._epoch, batch) == (self.epoch, self.batch):
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_history_and_switch(tmp_path):
    x, y = regression(batches=10)
    y[6 * BATCH: 7 * BATCH] *= 100.0  # clipping switches on at step 6
    model = build()
    clip = keras_vg.AutoClip(keras_vg.Percentile(p=50, history=8), trigger=keras_vg.ZScore(warmup=4), verbose=0)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    saved = {}
    keep = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: saved.update(clip.state()))
    with pytest.raises(RuntimeError, match="interrupted"):
        # The backup is taken at the end of the first epoch (10 steps); the second is interrupted.
        fit(model, x, y, [backup, clip, keep, StopInEpoch(1, 3)],
            epochs=2)
    assert saved["active"] == 1.0

    # A fresh process: new model, new callbacks (listed before the backup: order does not matter).
    keras.backend.clear_session()
    resumed = build()
    resumed_clip = keras_vg.AutoClip(keras_vg.Percentile(p=50, history=8), trigger=keras_vg.ZScore(warmup=4),
                                     verbose=0)
    seen = {}

    class Peek(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.setdefault("state", resumed_clip.state())
            seen.setdefault("iterations", int(resumed.optimizer.iterations.numpy()))

    fit(resumed, x, y, [resumed_clip, keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), Peek()],
        epochs=2)
    assert seen["iterations"] == 10
    for name, value in saved.items():
        np.testing.assert_array_equal(seen["state"][name], value, err_msg=name)
    assert seen["state"]["active"] == 1.0  # not re-armed
    # The statistics carried on: the history holds the norms from before the interruption.
    assert seen["state"]["policy.size"] == 8.0


def test_model_checkpoint_weights_carry_the_state(tmp_path):
    x, y = regression(batches=10)
    y[6 * BATCH: 7 * BATCH] *= 100.0
    path = str(tmp_path / "ckpt.weights.h5")
    model = build()
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), verbose=0)
    fit(model, x, y, [clip, keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    saved = clip.state()
    assert saved["active"] == 1.0

    restored = build()
    restored_clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), verbose=0)
    restored_clip.set_model(restored)  # attach the state before loading it
    restored.load_weights(path)
    for name, value in saved.items():
        np.testing.assert_array_equal(restored_clip.state()[name], value, err_msg=name)

    # Weight files stay compatible both ways, and the model itself is unchanged.
    plain = build()
    plain.load_weights(path)
    assert len(plain.weights) == len(model.weights) and len(plain.layers) == len(model.layers)
    no_state = str(tmp_path / "plain.weights.h5")
    plain.save_weights(no_state)
    fresh = build()
    fresh_clip = keras_vg.AutoClip(verbose=0)
    fresh_clip.set_model(fresh)
    fresh.load_weights(no_state)
    assert fresh_clip.state()["active"] == 0.0


def test_model_save_and_load_model_bring_the_state_back(tmp_path):
    x, y = regression(batches=10)
    y[6 * BATCH: 7 * BATCH] *= 100.0  # on at step 6
    x[8 * BATCH] = np.nan  # step 8 skipped
    model = build()
    clip = keras_vg.AutoClip(keras_vg.Percentile(p=50, history=8), verbose=0)
    fit(model, x, y, [clip])
    saved = clip.state()
    assert saved["active"] == 1.0 and saved["skipped"] == 1 and saved["last_good"] == 9 and saved["clipped"] >= 1
    assert saved["policy.size"] == 8.0 and saved["guard.size"] == 9.0  # the NaN step left both as they were
    path = str(tmp_path / "model.keras")
    model.save(path)

    # load_model rebuilds the model from its config, which knows nothing of AutoClip; the state comes
    # back once an AutoClip of the same configuration is attached and the file's weights are loaded.
    loaded = keras.models.load_model(path)
    restored = keras_vg.AutoClip(keras_vg.Percentile(p=50, history=8), verbose=0)
    restored.set_model(loaded)
    assert restored.state()["active"] == 0.0  # fresh until loaded
    loaded.load_weights(path)
    for name, value in saved.items():
        np.testing.assert_array_equal(restored.state()[name], value, err_msg=name)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # ...and training goes on from there: clipping stays on, the counts continue.
    fit(loaded, x[: 2 * BATCH], y[: 2 * BATCH], [restored])
    assert restored.active and restored.state()["last_good"] == 11


def test_mirrored_state_is_restored_on_every_replica(tmp_path, two_cpu_strategy):
    x, y = regression(batches=10)
    y[6 * BATCH: 7 * BATCH] *= 100.0
    strategy = two_cpu_strategy
    model = build(strategy=strategy)
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), verbose=0)
    fit(model, x, y, [clip])
    saved = clip.state()
    assert saved["active"] == 1.0
    path = str(tmp_path / "mirrored.weights.h5")
    model.save_weights(path)

    restored = build(strategy=strategy)
    restored_clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), verbose=0)
    restored_clip.set_model(restored)
    restored.load_weights(path)
    for kind, variable in restored_clip._state.packed.items():
        expected = restored_clip._state._pack_numpy(saved, kind)
        for replica_value in strategy.experimental_local_results(variable):
            np.testing.assert_array_equal(np.asarray(replica_value), expected, err_msg=str(kind))


# Records ----------------------------------------------------------------------------------


def test_log_dir_records_read_back(tmp_path):
    x, y = regression(batches=12)
    y[8 * BATCH: 9 * BATCH] *= 100.0
    x[10 * BATCH] = np.nan
    model = build()
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=4), log_dir=tmp_path, every=2, verbose=0)
    fit(model, x, y, [clip])
    run = keras_vg.read_run(tmp_path)
    steps, names, clipped = run.stat("clipped")
    np.testing.assert_array_equal(steps, [0, 2, 4, 6, 8, 10])
    assert names == []
    # Counts since the previous record: the spike at 8, step 9 (held to the guard's SGD cap once on), the
    # NaN step at 10 (skipped, not clipped).
    np.testing.assert_array_equal(clipped, [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(run.stat("skipped")[2], [0, 0, 0, 0, 0, 1])
    threshold = run.stat("clip_threshold")[2]
    assert np.all(np.isfinite(threshold) & (threshold > 0))  # the guard's, in the warm-up too
    pre, post = run.stat("global_grad_norm")[2], run.stat("global_grad_norm_clipped")[2]
    assert post[4] < pre[4] and post[4] <= threshold[4]
    assert [(e["kind"], e["step"]) for e in run.events()] == [("clip_on", 8), ("skip", 10)]
    assert all(e["message"] for e in run.events())


@pytest.mark.parametrize("strategy, monitor_first", [(None, True), (None, False), ("mirrored", True)],
                         ids=["monitor_first", "autoclip_first", "mirrored"])
def test_gradient_monitor_collects_the_clipping_records(tmp_path, strategy, monitor_first, two_cpu_strategy):
    x, y = regression(batches=8)
    y[6 * BATCH: 7 * BATCH] *= 100.0
    model = build(strategy=two_cpu_strategy if strategy else None)
    clip = keras_vg.AutoClip(keras_vg.ZScore(warmup=3), verbose=0)
    monitor = keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)
    # Whichever callback ends first, the last records reach the monitor's file.
    fit(model, x, y, [monitor, clip] if monitor_first else [clip, monitor])
    assert RunLog.of(model).sources == [clip]  # the run both callbacks write into
    run = keras_vg.read_run(tmp_path)
    steps, _, pre = run.stat("global_grad_norm")  # the monitor's, before clipping
    np.testing.assert_array_equal(steps, np.arange(8))
    np.testing.assert_array_equal(run.stat("global_grad_norm_clipped")[0], np.arange(8))
    post = run.stat("global_grad_norm_clipped")[2]
    np.testing.assert_allclose(post[:6], pre[:6], rtol=1e-5)
    assert post[6] < pre[6] / 2
    assert ("clip_on", 6) in [(e["kind"], e["step"]) for e in run.events()]
    # The clipped gradient is what SGD applied: ‖Δw‖ = lr·(post/pre)·‖g‖ for every variable.
    ratio, weight_norm, grad_norm = (run.stat(s)[2][6] for s in ("update_ratio", "weight_norm", "grad_norm"))
    np.testing.assert_allclose(ratio * weight_norm / (0.01 * grad_norm), post[6] / pre[6], rtol=1e-3)
    monitor.close()


@pytest.mark.parametrize("through", ["monitor", "log_dir"])
def test_a_recompile_continues_the_step_axis(tmp_path, through):
    """A recompile restarts `iterations` at 0; AutoClip's records and events in one log_dir only go forward."""
    x, y = regression(batches=6)
    x[4 * BATCH] = np.nan  # step 4 of each fit is skipped: one `skip` event per fit

    def one_fit(model):
        if through == "monitor":
            clip = keras_vg.AutoClip(verbose=0)
            monitor = keras_vg.GradientMonitor(tmp_path, every=1, verbose=0)
            fit(model, x, y, [clip, monitor])
            monitor.close()
        else:
            fit(model, x, y, [keras_vg.AutoClip(log_dir=tmp_path, verbose=0)])

    model = build()
    one_fit(model)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")  # a new optimizer: iterations from 0
    one_fit(model)
    assert int(model.optimizer.iterations.numpy()) == 6
    run = keras_vg.read_run(tmp_path)
    np.testing.assert_array_equal(run.stat("skipped")[0], np.arange(12))
    np.testing.assert_array_equal(run.stat("skipped")[2], [0, 0, 0, 0, 1, 0] * 2)
    skips = [e for e in run.events() if e["kind"] == "skip"]
    assert [e["step"] for e in skips] == [4, 10]
    assert skips[1]["message"].startswith("Step 10 skipped")  # the message speaks the run's steps too


def test_live_warnings_call_autoclip_skips_skipped_never_stalled(tmp_path, capsys):
    x, y = regression(batches=12)
    x[[5 * BATCH, 6 * BATCH, 9 * BATCH]] = np.nan  # AutoClip skips steps 5, 6 and 9: no update there
    model = build()
    monitor = keras_vg.GradientMonitor(tmp_path, every=1, verbose=1)
    fit(model, x, y, [monitor, keras_vg.AutoClip(verbose=0)])
    monitor.close()
    alerts = [e["message"] for e in keras_vg.read_run(tmp_path).events() if e["kind"] == "alert"]
    printed = capsys.readouterr().err
    # The warning when it starts, at the first skipped step ...
    assert [m for m in alerts if m.startswith("Steps skipped by AutoClip")] == [
        "Steps skipped by AutoClip, step 5: 1 steps with a non-finite gradient were not applied."]
    assert not any("Stalled" in m for m in alerts) and "Stalled" not in printed
    # ... and the summary at the end of fit: the whole episode, as the report has it.
    whole = "Steps skipped by AutoClip, steps 5-9: 3 steps with a non-finite gradient were not applied."
    assert f"  - {whole}" in printed.splitlines()
    from keras_vg import detect

    assert [e.message for e in detect.find_episodes(detect.classify(keras_vg.read_run(tmp_path)))
            if e.kind == "skipped"] == [whole]


def test_recording_failure_warns_and_clipping_goes_on(tmp_path, monkeypatch):
    from keras_vg.event_writer import EventWriter

    x, y = regression(batches=6)
    reference = build()
    fit(reference, x, y, [clip_every_step()])

    original = EventWriter.write_record

    def failing_after_step_2(self, step, *args, **kwargs):
        if step > 2:
            raise OSError("disk full")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(EventWriter, "write_record", failing_after_step_2)
    model = build()
    clip = keras_vg.AutoClip(keras_vg.GlobalNorm(0.5), trigger=None, log_dir=tmp_path, verbose=0)
    with pytest.warns(UserWarning, match="AutoClip stopped recording after an error: OSError: disk full"):
        fit(model, x, y, [clip])
    for a, b in zip(reference.weights, model.weights):  # every step was still clipped
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(keras_vg.read_run(tmp_path).stat("clipped")[0], [0, 1, 2])


def test_a_new_autoclip_replaces_the_previous_one():
    x, y = regression(batches=3)
    model = build()
    first = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [first])
    second = keras_vg.AutoClip(keras_vg.GlobalNorm(1e-3), trigger=None, verbose=0)
    fit(model, x, y, [second])
    assert first.trace_count == 1 and second.trace_count == 1
    assert [v["clipped"] for _, v in second.read_new()] == [1.0, 1.0, 1.0]
    assert first.read_new()[-1][0] == 2  # the first one saw nothing of the second fit
    assert len(model.optimizer._keras_vg_stages._stages) == 1


def test_fit_twice_and_close_twice():
    x, y = regression(batches=2)
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [clip])
    fit(model, x, y, [clip])
    clip.close()
    clip.close()
    fit(model, x, y, [])  # runs unclipped, without the hooks
    assert "_backend_update_step" not in model.optimizer.__dict__
    assert os.fspath(clip.get_config()["policy"]).startswith("ZScore(")


def test_a_backend_it_cannot_hook_gets_one_warning_and_training_as_without_it(monkeypatch):
    # Keras's torch backend, as AutoClip sees it (Keras's own modules still run TensorFlow here).
    x, y = regression(batches=3)
    x[BATCH + 1] = np.nan  # a step AutoClip would skip
    plain = build()
    fit(plain, x, y, [])
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    model, clip = build(), keras_vg.AutoClip(verbose=0)
    with pytest.warns(UserWarning, match="'torch' backend is not supported") as caught:
        for _ in range(2):  # a second fit with the same callback: still one warning
            fit(model, x, y, [clip])
    assert sum("AutoClip" in str(w.message) for w in caught) == 1
    fit(plain, x, y, [])
    for a, b in zip(model.weights, plain.weights):  # NaN included: nothing was skipped
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not clip.active and clip.read_new() == [] and clip.drain_events() == []
