"""Clipping policies on their own: each against a numpy re-implementation of its paper's rule.

No `fit` here: the policies are pure functions of explicit state, called
eagerly on fixed sequences of norms and gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vg
from keras_vg.clipping.agc import output_layer_variables, unit_axes, unitwise_norm


def norm_sequence(steps=120, seed=0):
    """Log-normal norms with spikes (×30, ×8) and a slow drift, as a float32 sequence."""
    rng = np.random.RandomState(seed)
    norms = np.exp(rng.randn(steps) * 0.3) * np.linspace(1.0, 2.0, steps)
    norms[[30, 31, 60, 90]] *= [30.0, 8.0, 30.0, 12.0]
    return norms.astype(np.float32)


def run_policy(policy, norms):
    """Feeds the norms one by one; returns the per-step (exceeded, threshold, norm_after)."""
    state = {k: tf.constant(v) for k, v in policy.init().items()}
    out = []
    for norm in norms:
        decision, state = policy.update(state, tf.constant(norm))
        out.append((bool(decision.exceeded), float(decision.threshold), float(decision.norm_after)))
    exceeded, threshold, after = (np.array(column) for column in zip(*out))
    return exceeded, threshold, after


# numpy references, written from the papers (and their authors' code) -------------------


def zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6):
    """ZClip (Kumar et al. 2025), zscore mode with adaptive scaling, as bluorion-com/ZClip does it."""
    buffer, mean, var = [], None, None
    exceeded, threshold, after = [], [], []
    for g in norms.astype(np.float64):
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup:
                mean = np.mean(buffer)
                var = np.mean((np.array(buffer) - mean) ** 2)
            exceeded.append(False)
            threshold.append(np.nan)
            after.append(g)
            continue
        std = np.sqrt(var)
        z = (g - mean) / (std + eps)
        spike = z > z_thresh
        x = mean + (z_thresh * std) / (z / z_thresh) if spike else g
        threshold.append(mean + z_thresh * (std + eps))
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
        exceeded.append(spike)
        after.append(x)
    return np.array(exceeded), np.array(threshold), np.array(after)


def autoclip_reference(norms, p=10, history=1000):
    """AutoClip (Seetharaman et al. 2020): the p-th percentile of the norms so far, this one included."""
    seen, exceeded, threshold, after = [], [], [], []
    for g in norms.astype(np.float64):
        seen.append(g)
        clip_value = np.percentile(seen[-history:], p)
        exceeded.append(g > clip_value)
        threshold.append(clip_value)
        after.append(min(g, clip_value))
    return np.array(exceeded), np.array(threshold), np.array(after)


def agc_reference(grad, weight, clip_factor=0.01, eps=1e-3):
    """AGC (Brock et al. 2021) as optax.adaptive_grad_clip computes it, in float64."""
    grad, weight = grad.astype(np.float64), weight.astype(np.float64)
    axes = {1: None, 2: (0,), 3: (0,), 4: (0, 1, 2)}[weight.ndim]
    if np.squeeze(weight).ndim <= 1:
        axes = None

    def unitwise(x):
        return np.sqrt(np.sum(x * x, axis=axes, keepdims=axes is not None))

    g_norm = unitwise(grad)
    max_norm = clip_factor * np.maximum(unitwise(weight), eps)
    return np.where(g_norm < max_norm, grad, grad * (max_norm / np.maximum(g_norm, 1e-6)))


# Thresholds against the references -------------------------------------------------------


def test_zscore_matches_zclip_reference():
    norms = norm_sequence()
    exceeded, threshold, after = run_policy(keras_vg.ZScore(), norms)
    ref_exceeded, ref_threshold, ref_after = zclip_reference(norms)
    np.testing.assert_array_equal(exceeded, ref_exceeded)
    assert exceeded[[30, 60, 90]].all() and not exceeded[:25].any()
    np.testing.assert_allclose(threshold, ref_threshold, rtol=1e-5)  # NaN during warm-up on both
    np.testing.assert_allclose(after, ref_after, rtol=1e-5)


@pytest.mark.parametrize("alpha, z, warmup", [(0.9, 2.0, 5), (0.99, 3.0, 1)])
def test_zscore_matches_reference_with_other_settings(alpha, z, warmup):
    norms = norm_sequence(seed=1)
    got = run_policy(keras_vg.ZScore(alpha=alpha, z=z, warmup=warmup), norms)
    ref = zclip_reference(norms, alpha=alpha, z_thresh=z, warmup=warmup)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5)


@pytest.mark.parametrize("p, history", [(10, 1000), (50, 7), (90, 30), (100, 5)])
def test_percentile_matches_autoclip_reference(p, history):
    norms = norm_sequence()
    exceeded, threshold, after = run_policy(keras_vg.Percentile(p=p, history=history), norms)
    ref_exceeded, ref_threshold, ref_after = autoclip_reference(norms, p=p, history=history)
    np.testing.assert_allclose(threshold, ref_threshold, rtol=1e-6)
    np.testing.assert_allclose(after, ref_after, rtol=1e-6)
    # Where a norm sits at the threshold, float32 and float64 may disagree on ">": compare elsewhere.
    clear = ~np.isclose(norms, ref_threshold, rtol=1e-6)
    np.testing.assert_array_equal(exceeded[clear], ref_exceeded[clear])


def test_global_norm_threshold():
    norms = norm_sequence()
    exceeded, threshold, after = run_policy(keras_vg.GlobalNorm(2.0), norms)
    np.testing.assert_array_equal(exceeded, norms > 2.0)
    np.testing.assert_array_equal(threshold, np.full(len(norms), 2.0))
    np.testing.assert_allclose(after, np.minimum(norms, 2.0), rtol=1e-7)


def agc_case(seed=0):
    """Weights and gradients of every rank AGC sees, some units far above λ‖W‖, some below."""
    rng = np.random.RandomState(seed)
    shapes = [(8,), (6, 4), (5, 2, 3), (3, 3, 2, 4), (1, 7)]
    weights = [rng.randn(*s).astype(np.float32) for s in shapes]
    weights[0][:] = 0.0  # a zero-initialised bias: eps keeps it movable
    grads = [(rng.randn(*s) * rng.choice([1e-4, 1e-1], size=s[-1:])).astype(np.float32) for s in shapes]
    return weights, grads


def test_agc_matches_optax_formula():
    weights, grads = agc_case()
    policy = keras_vg.AGC(clip_factor=0.01, eps=1e-3)
    variables = [tf.Variable(w) for w in weights]
    tensors = [tf.constant(g) for g in grads]
    decision, _ = policy.update({}, tf.constant(1.0), tensors, variables)
    clipped = policy.clip(decision, tensors)
    for got, g, w in zip(clipped, grads, weights):
        np.testing.assert_allclose(got.numpy(), agc_reference(g, w), rtol=1e-5, atol=1e-12)
    assert bool(decision.exceeded)
    assert np.isnan(float(decision.threshold))
    expected = np.sqrt(sum(np.sum(agc_reference(g, w).astype(np.float64) ** 2) for g, w in zip(grads, weights)))
    np.testing.assert_allclose(float(decision.norm_after), expected, rtol=1e-5)


def test_agc_unit_axes_follow_optax():
    assert unit_axes([10]) is None
    assert unit_axes([1, 7]) is None
    assert unit_axes([6, 4]) == (0,)
    assert unit_axes([5, 2, 3]) == (0,)
    assert unit_axes([3, 3, 2, 4]) == (0, 1, 2)
    assert unit_axes([2, 3, 3, 2, 4]) == (0, 1, 2, 3)


@pytest.mark.parametrize("shape", [[10], [6, 4], [5, 2, 3], [3, 3, 2, 4], [2, 3, 3, 2, 4]])
def test_unitwise_norm_matches_numpy(shape):
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    axes = unit_axes(shape)
    expected = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=axes, keepdims=True))
    got = unitwise_norm(tf.constant(x), axes).numpy()
    assert got.shape == (expected.shape if axes is not None else (1,) * len(shape))
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-6)


def test_agc_excludes_the_output_layer():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    assert [v.path for v in output_layer_variables(model)] == ["head/kernel", "head/bias"]
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2, name="out"),
                                   keras.layers.Dropout(0.1)])
    assert [v.path for v in output_layer_variables(sequential)] == ["sequential/out/kernel", "sequential/out/bias"]

    policy = keras_vg.AGC()
    policy.bind(model)
    huge = [tf.ones(v.shape) * 100.0 for v in model.trainable_variables]
    decision, _ = policy.update({}, tf.constant(1.0), huge, model.trainable_variables)
    clipped = policy.clip(decision, huge)
    assert np.all(clipped[0].numpy() < 100.0)  # hidden kernel clipped
    np.testing.assert_array_equal(clipped[2].numpy(), huge[2].numpy())  # head kernel left alone
    np.testing.assert_array_equal(clipped[3].numpy(), huge[3].numpy())


# Properties over many steps ---------------------------------------------------------------


def random_grads(rng, scale):
    return [tf.constant(rng.randn(6, 4).astype(np.float32) * scale), tf.constant(rng.randn(4).astype(np.float32))]


def global_norm(tensors):
    return float(np.sqrt(sum(np.sum(t.numpy().astype(np.float64) ** 2) for t in tensors)))


@pytest.mark.parametrize("make", [lambda: keras_vg.ZScore(warmup=5), lambda: keras_vg.Percentile(p=30, history=20),
                                  lambda: keras_vg.GlobalNorm(3.0)], ids=["zscore", "percentile", "global_norm"])
def test_norm_policies_bound_the_norm_and_are_idempotent(make):
    policy = make()
    rng = np.random.RandomState(0)
    state = {k: tf.constant(v) for k, v in policy.init().items()}
    clipped_steps = 0
    for step in range(150):
        grads = random_grads(rng, 40.0 if step % 17 == 16 else 1.0)
        norm = tf.constant(global_norm(grads), tf.float32)
        decision, new_state = policy.update(state, norm)
        clipped = policy.clip(decision, grads)
        after = global_norm(clipped)
        np.testing.assert_allclose(after, float(decision.norm_after), rtol=1e-5)
        if bool(decision.exceeded):
            clipped_steps += 1
            # After clipping the norm is at most the threshold...
            assert after <= float(decision.threshold) * (1 + 1e-6)
            # ...and clipping again at that threshold changes nothing.
            again = keras_vg.clipping.policy.norm_decision(tf.constant(after, tf.float32), decision.threshold,
                                                           decision.threshold)
            if isinstance(policy, (keras_vg.ZScore, keras_vg.GlobalNorm)):
                again, _ = policy.update(state, tf.constant(after, tf.float32))
            assert not bool(again.exceeded) or abs(float(again.factor) - 1.0) < 1e-6
        else:
            assert after == global_norm(grads)
        state = new_state
    assert clipped_steps >= 8


def test_agc_bounds_every_unit_and_is_idempotent():
    policy = keras_vg.AGC(clip_factor=0.05)
    rng = np.random.RandomState(0)
    weights = [tf.Variable(rng.randn(6, 4).astype(np.float32)), tf.Variable(np.zeros(4, np.float32))]
    for step in range(60):
        grads = random_grads(rng, 10.0 if step % 3 == 0 else 0.01)
        decision, _ = policy.update({}, tf.constant(global_norm(grads)), grads, weights)
        clipped = policy.clip(decision, grads)
        unit_norms = np.linalg.norm(clipped[0].numpy(), axis=0)
        bound = 0.05 * np.maximum(np.linalg.norm(weights[0].numpy(), axis=0), 1e-3)
        assert np.all(unit_norms <= bound * (1 + 1e-5))
        assert np.linalg.norm(clipped[1].numpy()) <= 0.05 * 1e-3 * (1 + 1e-5)
        again, _ = policy.update({}, tf.constant(global_norm(clipped)), clipped, weights)
        for g, twice in zip(clipped, policy.clip(again, clipped)):
            np.testing.assert_allclose(twice.numpy(), g.numpy(), rtol=1e-5)


def test_zscore_state_advances_as_expected():
    policy = keras_vg.ZScore(alpha=0.5, warmup=2)
    state = {k: tf.constant(v) for k, v in policy.init().items()}
    for norm in [1.0, 3.0]:
        _, state = policy.update(state, tf.constant(norm))
    assert float(state["mean"]) == 2.0 and float(state["var"]) == 1.0 and float(state["count"]) == 2.0
    _, state = policy.update(state, tf.constant(2.0))
    assert float(state["mean"]) == 2.0 and float(state["var"]) == 0.5


def test_percentile_history_is_a_bounded_ring():
    policy = keras_vg.Percentile(p=100, history=3)
    state = {k: tf.constant(v) for k, v in policy.init().items()}
    thresholds = []
    for norm in [5.0, 1.0, 1.0, 1.0, 2.0]:
        decision, state = policy.update(state, tf.constant(norm))
        thresholds.append(float(decision.threshold))
    assert thresholds == [5.0, 5.0, 5.0, 1.0, 2.0]  # the 5.0 leaves the window after three norms
    assert state["norms"].shape == (3,)


def test_sparse_gradients_are_scaled_by_their_values():
    grads = [tf.IndexedSlices(tf.constant([[3.0, 4.0]]), tf.constant([1]), tf.constant([5, 2]))]
    decision, _ = keras_vg.GlobalNorm(1.0).update({}, tf.constant(5.0))
    clipped = keras_vg.GlobalNorm(1.0).clip(decision, grads)[0]
    assert isinstance(clipped, tf.IndexedSlices)
    np.testing.assert_allclose(clipped.values.numpy(), [[0.6, 0.8]], rtol=1e-6)


# Configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: keras_vg.GlobalNorm(0), "Received: threshold=0"),
    (lambda: keras_vg.GlobalNorm(float("inf")), "Received: threshold=inf"),
    (lambda: keras_vg.Percentile(p=0), "Received: p=0"),
    (lambda: keras_vg.Percentile(p=101), "Received: p=101"),
    (lambda: keras_vg.Percentile(history=2.5), "Received: history=2.5"),
    (lambda: keras_vg.ZScore(alpha=1.0), "Received: alpha=1.0"),
    (lambda: keras_vg.ZScore(warmup=0), "Received: warmup=0"),
    (lambda: keras_vg.AGC(clip_factor=-1), "Received: clip_factor=-1"),
    (lambda: keras_vg.ZScore(skip_nonfinite=1), "Received: skip_nonfinite=1"),
    (lambda: keras_vg.AutoClip(policy="zclip"), "Received: policy='zclip'"),
    (lambda: keras_vg.AutoClip(trigger="sometimes"), "Received: trigger='sometimes'"),
    (lambda: keras_vg.AutoClip(cooldown=0), "Received: cooldown=0"),
    (lambda: keras_vg.AutoClip(trigger=None, cooldown=3), "`cooldown` needs a trigger"),
    (lambda: keras_vg.AutoClip(every=0), "Received: every=0"),
    (lambda: keras_vg.AutoClip(verbose=2), "Received: verbose=2"),
    (lambda: keras_vg.AutoClip(log_dir=""), "Received: log_dir=''"),
])
def test_bad_configuration_raises_keras_style(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_policies_by_name_and_repr():
    assert isinstance(keras_vg.AutoClip().policy, keras_vg.ZScore)
    assert keras_vg.AutoClip().trigger is None  # the guard's spikes
    assert keras_vg.AutoClip(policy="percentile").trigger is None
    assert isinstance(keras_vg.AutoClip(trigger=keras_vg.ZScore(z=4.0)).trigger, keras_vg.ZScore)
    assert keras_vg.AutoClip(policy="global_norm").policy.threshold == 1.0
    assert isinstance(keras_vg.AutoClip(policy="agc").policy, keras_vg.AGC)
    assert repr(keras_vg.Percentile()) == "Percentile(p=10.0, history=1000, skip_nonfinite=True)"


def test_global_norm_is_one_read_and_flags_nonfinite_and_overflow():
    from keras_vg.clipping.in_step import global_norm as _global_norm

    norm, finite = _global_norm([tf.constant([3.0, 4.0]), tf.constant([[12.0]])])
    assert float(norm) == 13.0 and bool(finite)
    norm, finite = _global_norm([tf.constant([3e18, 4e18]), tf.constant([0.0])])  # past MAX_NORM, still exact
    np.testing.assert_allclose(float(norm), 5e18, rtol=1e-6)
    assert bool(finite)
    # Squares past float32's range (a norm past 1.8e19) count as non-finite: skipped like a NaN.
    for bad in (np.nan, np.inf, 3e19):
        norm, finite = _global_norm([tf.constant([1.0, bad])])
        assert not bool(finite) and not np.isfinite(float(norm))


# The spike guard and the whole per-step decision (ClipSwitch) ------------------------------

from keras_vg.clipping import MAX_NORM, ClipSwitch, SpikeGuard  # noqa: E402


def guard_reference(norms, factor=10.0, window=32):
    """The guard's ratio rule in numpy: each norm against the median of the last `window` norms let in."""
    seen, spikes, limits = [], [], []
    for g in norms.astype(np.float64):
        recent = seen[-window:]
        median = np.median(recent) if recent else np.nan
        limit = min(factor * median, MAX_NORM) if recent and median > 0 else MAX_NORM
        spikes.append(bool((recent and median > 0 and g > limit) or g > MAX_NORM))
        limits.append(limit)
        if np.isfinite(g) and g > 0:
            seen.append(min(g, limit))
    return np.array(spikes), np.array(limits)


def run_switch(switch, norms, step_size=None, weight_norm=None):
    """Feeds `norms` to `switch.update` one by one; returns the per-step decisions and states (after each step).

    As a `tf.function`, as `AutoClip` runs it (and much faster than eagerly).
    """
    update = tf.function(switch.update)
    state = {k: tf.constant(v) for k, v in switch.init().items()}
    decisions, states = [], []
    for step, norm in enumerate(np.asarray(norms, np.float32)):
        decision, state = update(
            state, tf.constant(norm), tf.constant(bool(np.isfinite(norm))), tf.constant(step, tf.int64),
            None if step_size is None else tf.constant(step_size, tf.float32),
            None if weight_norm is None else tf.constant(weight_norm, tf.float32))
        decisions.append(decision)
        states.append({k: v.numpy() for k, v in state.items()})
    return decisions, states


def hostile_norms(seed=0):
    """Norms a broken run produces: zeros, NaN, ±inf, 1e30 and 1e-30, long constant runs, between noisy ones."""
    rng = np.random.RandomState(seed)
    noisy = lambda n: np.exp(rng.randn(n) * 0.3)  # noqa: E731
    return np.concatenate([
        [0.0, np.nan, 1e30, np.inf], noisy(8), [0.0] * 5, [np.nan, -np.inf, 1e30, 1e30, 1e-30], noisy(20),
        [3.0] * 60, [1e30] * 6, noisy(10) * 1e6, [1e-30] * 40, noisy(10), [np.inf] * 3, [5e18, 2e19], noisy(5),
    ]).astype(np.float32)


SWITCHES = {
    "default": lambda: ClipSwitch(keras_vg.ZScore(), None, SpikeGuard()),
    "zscore_short_warmup": lambda: ClipSwitch(keras_vg.ZScore(warmup=3), None, SpikeGuard(), cooldown=4),
    "percentile": lambda: ClipSwitch(keras_vg.Percentile(p=10, history=50), keras_vg.ZScore(), SpikeGuard()),
    "global_norm_always_on": lambda: ClipSwitch(keras_vg.GlobalNorm(2.0), None, SpikeGuard(), armed=False),
    "global_norm_triggered": lambda: ClipSwitch(keras_vg.GlobalNorm(0.5), keras_vg.ZScore(warmup=5),
                                                SpikeGuard(factor=4.0, window=8)),
}


@pytest.mark.parametrize("make", list(SWITCHES.values()), ids=list(SWITCHES))
@pytest.mark.parametrize("sgd", [False, True], ids=["adaptive", "sgd"])
def test_switch_invariants_hold_on_every_step_of_a_hostile_sequence(make, sgd):
    switch = make()
    norms = hostile_norms()
    decisions, states = run_switch(switch, norms, *((0.1, 5.0) if sgd else (None, None)))
    previous = {k: np.asarray(v) for k, v in switch.init().items()}
    statistics = [k for k in previous if k.startswith(("guard.", "policy.", "trigger."))]
    for step, (norm, decision, state) in enumerate(zip(norms, decisions, states)):
        where = f"step {step}, norm {norm}"
        threshold, after = float(decision.threshold), float(decision.norm_after)
        # Thresholds are finite and positive, whatever came before; no statistic is ever non-finite.
        assert np.isfinite(threshold) and threshold > 0, where
        for name, value in state.items():
            assert np.all(np.isfinite(value)), (where, name, value)
        if not np.isfinite(norm):
            assert bool(decision.skipped) and not bool(decision.clip), where
        if not np.isfinite(norm) or norm == 0:
            # A step that says nothing about the scale leaves every statistic as it was.
            for name in statistics:
                np.testing.assert_array_equal(state[name], previous[name], err_msg=f"{where}: {name}")
        elif previous["active"] > 0 or not switch.armed or bool(decision.switched_on):
            # Clipped to at most the threshold: clipping again at it would change nothing.
            assert after <= min(norm, threshold * (1 + 1e-6)), where
            # (The factor underflows to 0 only where the target is 1e-38 of the norm: 1e-29 against 5e18 here.)
            assert 0 <= float(decision.factor) <= 1 and bool(decision.clip) == (after < norm), where
        else:
            assert after == norm and not bool(decision.clip), where  # armed, and no spike: nothing clipped
        # The guard's window never holds more than MAX_NORM, nor a spike.
        assert np.all(state["guard.norms"] <= MAX_NORM), where
        previous = state
    assert sum(bool(d.switched_on) for d in decisions) >= switch.armed


def test_switch_counts_skips_and_the_last_good_step():
    norms = np.array([1.0, 1.1, np.nan, np.inf, 0.9, np.nan, np.nan, np.nan, 1.0], np.float32)
    decisions, states = run_switch(SWITCHES["default"](), norms)
    skipped = ~np.isfinite(norms)
    np.testing.assert_array_equal([bool(d.skipped) for d in decisions], skipped)
    run, last_good, runs, lasts = 0, -1, [], []
    for step, bad in enumerate(skipped):
        run, last_good = (run + 1, last_good) if bad else (0, step)
        runs.append(run)
        lasts.append(last_good)
    np.testing.assert_array_equal([s["skip_run"] for s in states], runs)
    np.testing.assert_array_equal([s["last_good"] for s in states], lasts)
    np.testing.assert_array_equal([s["skipped"] for s in states], np.cumsum(skipped))
    # The first non-finite step switched clipping on; clipping stays on (no cooldown).
    assert [bool(d.switched_on) for d in decisions] == [False, False, True] + [False] * 6
    assert states[-1]["active"] == 1.0


def test_guard_matches_its_numpy_reference():
    rng = np.random.RandomState(3)
    norms = np.exp(rng.randn(150) * 0.5).astype(np.float32)
    norms[[5, 6, 40, 41, 42, 90]] *= [30.0, 12.0, 50.0, 50.0, 50.0, 1e25]
    norms[[60, 61]] = [0.0, np.nan]
    guard = SpikeGuard(factor=10.0, window=16)
    state = {k: tf.constant(v) for k, v in guard.init().items()}
    spikes, limits = [], []
    for norm in norms:
        check = guard.check(state, tf.constant(norm))
        spikes.append(bool(check.spike))
        limits.append(float(check.limit))
        if np.isfinite(norm) and norm > 0:
            state = guard.update(state, tf.minimum(tf.constant(norm), check.limit))
    ref_spikes, ref_limits = guard_reference(norms, factor=10.0, window=16)
    np.testing.assert_allclose(limits, ref_limits, rtol=1e-6)
    clear = ~np.isclose(norms, ref_limits, rtol=1e-5)  # float32 and float64 may differ right at the limit
    np.testing.assert_array_equal(np.array(spikes)[clear], ref_spikes[clear])
    assert ref_spikes[[5, 40, 41, 42, 90]].all() and not ref_spikes[:5].any()


def test_guard_sgd_rules_from_the_first_step():
    guard = SpikeGuard(spike_update_ratio=0.2, clip_update_ratio=0.01)
    state = {k: tf.constant(v) for k, v in guard.init().items()}
    lr, weight_norm = tf.constant(0.2), tf.constant(12.0)
    # lr·‖g‖ = 18 against ‖W‖ = 12: the update would move the weights by 150% of their norm.
    check = guard.check(state, tf.constant(90.0), lr, weight_norm)
    assert bool(check.spike) and float(check.limit) == np.float32(MAX_NORM)
    np.testing.assert_allclose(float(check.cap), 0.01 * 12.0 / 0.2, rtol=1e-6)
    assert not bool(guard.check(state, tf.constant(11.0), lr, weight_norm).spike)  # 18% of ‖W‖
    # Without a measured weight norm (NaN, or 0) the SGD rules wait: no spike, no cap.
    for unknown in (np.nan, 0.0):
        check = guard.check(state, tf.constant(90.0), lr, tf.constant(unknown))
        assert not bool(check.spike) and np.isinf(float(check.cap))


def test_switch_sgd_cap_holds_every_step_once_on():
    decisions, _ = run_switch(SWITCHES["default"](), [90.0, 20.0, 80.0, 0.5], step_size=0.2, weight_norm=12.0)
    cap = 0.01 * 12.0 / 0.2
    assert bool(decisions[0].switched_on)
    np.testing.assert_allclose([float(d.norm_after) for d in decisions], [cap, cap, cap, 0.5], rtol=1e-6)
    assert [bool(d.clip) for d in decisions] == [True, True, True, False]


@pytest.mark.parametrize("make, message", [
    (lambda: SpikeGuard(factor=1.0), "Received: factor=1.0"),
    (lambda: SpikeGuard(window=0), "Received: window=0"),
    (lambda: keras_vg.AutoClip(spike_factor=0.5), "Received: factor=0.5"),
    (lambda: keras_vg.AutoClip(spike_update_ratio=-1), "Received: spike_update_ratio=-1"),
    (lambda: keras_vg.AutoClip(clip_update_ratio=float("nan")), "Received: clip_update_ratio=nan"),
    (lambda: keras_vg.AutoClip(skip_patience=0), "Received: skip_patience=0"),
])
def test_guard_configuration_errors(make, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        make()
