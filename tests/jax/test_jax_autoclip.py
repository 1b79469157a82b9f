"""AutoClip on Keras's JAX backend: the same decisions as on TensorFlow, inside the jitted step.

References are independent of keras-vg: `jax.grad` of the loss written out in
jax.numpy, SGD's identity Δw = −lr·g, a run on one device, and the rescue
benchmark's targets.

Run with `KERAS_BACKEND=jax`: see tests/conftest.py.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from rescue_cases import check_smallest_rescue_cases

import keras_vg

pytestmark = pytest.mark.fit

BATCH = 32
LR = 0.05


def regression(batches, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batches * BATCH, 8).astype("float32")
    return x, (x @ rng.randn(8, 1)).astype("float32")


def build(optimizer=lambda: keras.optimizers.SGD(LR)):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer(), loss="mse")
    return model


def fit(model, x, y, callbacks, epochs=1):
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)


def reference_gradient(weights, x, y):
    """`jax.grad` of the model's mean squared error, written out here."""
    def loss(params):
        kernel, bias, out_kernel, out_bias = params
        prediction = jnp.tanh(x @ kernel + bias) @ out_kernel + out_bias
        return jnp.mean(jnp.square(prediction - y))

    return [np.asarray(g) for g in jax.grad(loss)([jnp.asarray(w) for w in weights])]


def test_each_step_is_sgd_on_the_reference_gradient_clipped_as_recorded():
    x, y = regression(batches=6)
    y[3 * BATCH + 1] = 1e3  # batch 3: a spike
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    for step in range(6):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        before = [w.numpy() for w in model.trainable_weights]
        fit(model, x[batch], y[batch], [clip])
        after = [w.numpy() for w in model.trainable_weights]
        grads = reference_gradient(before, x[batch], y[batch])
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads))
        [(recorded_step, values)] = clip.read_new()
        assert recorded_step == step
        np.testing.assert_allclose(values["global_grad_norm"], norm, rtol=1e-5)
        factor = values["global_grad_norm_clipped"] / values["global_grad_norm"]
        assert (factor < 1) == bool(values["clipped"]) == (step >= 3), (step, values)
        for w0, w1, g in zip(before, after, grads):
            np.testing.assert_allclose(w1 - w0, -LR * factor * g, rtol=1e-4, atol=1e-7)
    assert [(e["kind"], e["step"]) for e in clip.drain_events()] == [("clip_on", 3)]
    assert clip.active and clip.trace_count == 1  # one trace for all six fits, clipping on or off


def test_nonfinite_step_leaves_weights_and_slots_bit_identical_while_iterations_advance():
    x, y = regression(batches=4)
    x[2 * BATCH + 5] = np.nan  # batch 2: a NaN gradient
    model = build(lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1))
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x[: 2 * BATCH], y[: 2 * BATCH], [clip])

    def snapshot():
        return {v.path: v.numpy().copy() for v in list(model.weights) + list(model.optimizer.variables)}

    before = snapshot()
    fit(model, x[2 * BATCH: 3 * BATCH], y[2 * BATCH: 3 * BATCH], [clip])
    after = snapshot()
    for path in before:
        if path == model.optimizer.iterations.path:
            assert after[path] == before[path] + 1  # every batch keeps its own step number
        else:
            assert after[path].tobytes() == before[path].tobytes(), path  # bit for bit
    assert [(e["kind"], e["step"]) for e in clip.drain_events()] == [("clip_on", 2), ("skip", 2)]
    assert clip.state()["skipped"] == 1 and clip.state()["last_good"] == 1
    fit(model, x[3 * BATCH:], y[3 * BATCH:], [clip])
    assert not np.array_equal(model.weights[0].numpy(), before[model.weights[0].path])


def test_cooldown_switches_off_and_on_again_without_a_retrace():
    x, y = regression(batches=16)
    for spike in (2, 10):
        y[spike * BATCH] = 1e3
    model = build()
    clip = keras_vg.AutoClip(cooldown=3, verbose=0)
    fit(model, x, y, [clip], epochs=2)
    kinds = [(e["kind"], e["step"]) for e in clip.drain_events()]
    assert kinds[:2] == [("clip_on", 2), ("clip_off", 5)] and ("clip_on", 10) in kinds, kinds
    assert clip.trace_count == 1


def test_skips_in_a_row_stop_training_with_the_last_good_step():
    x, y = regression(batches=40)
    x[4 * BATCH:] = np.nan  # from step 4 on, every gradient is NaN
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    with pytest.warns(UserWarning, match="AutoClip stopped training"):
        fit(model, x, y, [clip])
    assert model.stop_training and clip.stopped["last_good"] == 3
    # Within 32 steps of the tenth skip in a row (docs: checked every 32 steps or second).
    assert 13 <= clip.stopped["step"] <= 13 + 32


def test_saved_state_comes_back_with_load_weights(tmp_path):
    x, y = regression(batches=6)
    y[2 * BATCH] = 1e3
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [clip])
    saved = clip.state()
    assert saved["active"] == 1 and saved["clipped"] >= 1
    model.save_weights(tmp_path / "run.weights.h5")

    restored, clip_again = build(), keras_vg.AutoClip(verbose=0)
    fit(restored, x[:BATCH], y[:BATCH], [])  # built and trained, without AutoClip
    clip_again.set_model(restored)
    restored.load_weights(tmp_path / "run.weights.h5")
    for name, value in saved.items():
        np.testing.assert_array_equal(clip_again.state()[name], value, err_msg=name)
    fit(restored, x[:BATCH], y[:BATCH], [clip_again])  # resumes on: no clip_on again
    assert clip_again.state()["clipped"] > saved["clipped"] and clip_again.drain_events() == []


def test_data_parallel_over_two_devices_decides_as_one_device():
    assert len(jax.devices()) == 2, "tests/conftest.py asks XLA for two CPU devices"
    x, y = regression(batches=8)
    y[3 * BATCH + 7] = 1e3

    def run():
        model, clip = build(), keras_vg.AutoClip(verbose=0)
        fit(model, x, y, [clip])
        return clip.read_new(), [(e["kind"], e["step"]) for e in clip.drain_events()], model.get_weights()

    keras.backend.clear_session()
    one = run()
    keras.backend.clear_session()
    try:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        two = run()
    finally:
        keras.distribution.set_distribution(None)
    assert two[1] == one[1] == [("clip_on", 3)]
    assert [step for step, _ in two[0]] == [step for step, _ in one[0]] == list(range(8))
    for (_, a), (_, b) in zip(two[0], one[0]):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    for a, b in zip(two[2], one[2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_monitor_collects_the_records_between_its_own(tmp_path):
    # The monitor records every 4th step through its own function; AutoClip decides on every step.
    x, y = regression(batches=8)
    x[5 * BATCH] = np.nan  # step 5: skipped, between two of the monitor's records
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [keras_vg.GradientMonitor(tmp_path / "run", every=4, verbose=0), clip])
    run = keras_vg.read_run(tmp_path / "run")
    steps, _, skipped = run.stat("skipped")
    np.testing.assert_array_equal(steps, np.arange(8))
    np.testing.assert_array_equal(skipped.ravel(), (steps == 5).astype(float))
    assert [(e["kind"], e["step"]) for e in run.events() if e["kind"] in ("clip_on", "skip")] == [
        ("clip_on", 5), ("skip", 5)]
    [finding] = [f for f in run.diagnose().findings if f.kind == "skipped"]
    assert (finding.first_step, finding.last_step) == (5, 5) and "skipped by AutoClip" in finding.message


def test_mixed_float16_decides_on_the_unscaled_gradient_and_leaves_overflows_to_the_loss_scaler():
    x, y = regression(batches=4)
    y[2 * BATCH] = 1e3
    norms = {}
    for policy, scale in (("float32", None), ("mixed_float16", 2.0), ("mixed_float16", None)):
        keras.mixed_precision.set_global_policy(policy)
        model = build(lambda scale=scale: keras.optimizers.SGD(LR) if scale is None
                      else keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=scale))
        clip = keras_vg.AutoClip(verbose=0)
        fit(model, x, y, [clip])
        records = clip.read_new()
        events = [(e["kind"], e["step"]) for e in clip.drain_events()]
        if policy == "mixed_float16" and scale is None:
            # Keras's scale (32768) overflows float16 on the spike: the loss scaler skips that step
            # itself (its inner step count stays), and AutoClip neither sees nor counts it.
            assert [step for step, _ in records] == [0, 1, 2] and events == [] and clip.state()["skipped"] == 0
            np.testing.assert_allclose([v["global_grad_norm"] for _, v in records[:2]], norms["float32"][:2],
                                       rtol=2e-2)
            continue
        norms[policy] = np.array([values["global_grad_norm"] for _, values in records])
        assert events == [("clip_on", 2)], policy
    np.testing.assert_allclose(norms["mixed_float16"], norms["float32"], rtol=2e-2)


def test_rescue_benchmark_smallest_cases():
    """As tests/test_clipping.py's, on JAX: the ruinous first SGD step is rescued; a healthy run is untouched."""
    check_smallest_rescue_cases()


def test_a_recompile_and_a_new_monitor_keep_clipping_on_the_run_step_axis(tmp_path):
    x, y = regression(batches=4)
    model = build()
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [keras_vg.GradientMonitor(tmp_path / "run", every=1, verbose=0), clip])
    # A new optimizer counts from 0 again; a new monitor's tap wraps on top of AutoClip's hooks.
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    y[2 * BATCH] = 1e3
    fit(model, x, y, [keras_vg.GradientMonitor(tmp_path / "run", every=1, verbose=0), clip])
    run = keras_vg.read_run(tmp_path / "run")
    steps, _, clipped = run.stat("clipped")
    np.testing.assert_array_equal(steps, np.arange(8))
    np.testing.assert_array_equal(clipped.ravel() > 0, steps >= 6)
    assert [(e["kind"], e["step"]) for e in run.events() if e["kind"] == "clip_on"] == [("clip_on", 6)]


def test_steps_per_execution_decides_and_records_every_step():
    x, y = regression(batches=8)
    y[5 * BATCH] = 1e3  # step 5: a spike
    x[6 * BATCH + 2] = np.nan  # step 6: skipped
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=4)
    clip = keras_vg.AutoClip(verbose=0)
    fit(model, x, y, [clip])
    records = clip.read_new()
    assert [step for step, _ in records] == list(range(8))
    assert [(v["clipped"], v["skipped"]) for _, v in records] == [(0, 0)] * 5 + [(1, 0), (0, 1), (1, 0)]
    assert [(e["kind"], e["step"]) for e in clip.drain_events()] == [("clip_on", 5), ("skip", 6)]
