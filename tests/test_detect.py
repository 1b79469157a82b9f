"""Tests of keras_vg.detect: the region rules, episodes and the streaming detector.

numpy only. Every figure is synthetic, except the MLP test, which backpropagates
through a real 10-layer network written in numpy.
"""

import copy
import functools

import numpy as np
import pytest

from keras_vg import detect
from keras_vg.detect import (
    CLASS_NAMES,
    DEAD,
    EXPLODING,
    HEALTHY,
    NONFINITE,
    SATURATED,
    VANISHING,
    StreamingDetector,
    Thresholds,
    classify,
    find_episodes,
)

pytestmark = pytest.mark.filterwarnings("error")  # no RuntimeWarning from NaN or 0/0


def _names(n, suffix="kernel"):
    return [f"dense_{i}/{suffix}" for i in range(n)]


def _noisy(rng, shape, scale=1.0, sigma=0.1):
    return (scale * rng.lognormal(0.0, sigma, shape)).astype(np.float32)


def _stat(values, names=None, steps=None):
    values = np.asarray(values, np.float32)
    steps = np.arange(len(values)) if steps is None else np.asarray(steps)
    if values.ndim == 1:
        return steps, [], values
    return steps, list(names if names is not None else _names(values.shape[1])), values


def _kinds(episodes):
    return [(e.kind, e.names, e.first_step, e.last_step) for e in episodes]


# ---------------------------------------------------------------------------
# Vanishing


def test_geometric_decay_flags_the_first_layers_only():
    depth = np.arange(10)
    norms = np.tile(0.25 ** (9 - depth), (30, 1))  # layer 0 is 0.25**9 = 3.8e-6 of layer 9
    result = classify({"grad_norm": _stat(norms)})
    expected = np.where(0.25 ** (9 - depth) < 1e-3, VANISHING, HEALTHY)
    assert (expected[:5] == VANISHING).all() and (expected[5:] == HEALTHY).all()
    assert (result.codes == expected).all()
    [episode] = find_episodes(result)
    assert episode.kind == "vanishing"
    assert episode.names == tuple(_names(5))
    assert (episode.first_name, episode.last_name) == ("dense_0/kernel", "dense_4/kernel")
    assert (episode.first_step, episode.last_step) == (0, 29)
    assert episode.figure == pytest.approx(0.25**9, rel=1e-5)
    assert episode.threshold == 1e-3
    assert "in layers dense_0 ... dense_4 (5 layers), steps 0-29" in episode.message


def test_flat_profile_is_healthy():
    rng = np.random.default_rng(0)
    result = classify({"grad_norm": _stat(_noisy(rng, (200, 10), sigma=0.3))})
    assert (result.codes == HEALTHY).all()
    assert find_episodes(result) == []


def _mlp_gradient_norms(activation, depth=10, width=64, batch=128, seed=0):
    """Kernel and bias gradient norms of a fresh MLP, by backpropagation in numpy.

    Sigmoid layers use Glorot-uniform initialisation, ReLU layers He-normal,
    as Keras would; biases start at zero; the loss is softmax cross-entropy.
    """
    rng = np.random.default_rng(seed)
    x, labels = rng.normal(size=(batch, width)), rng.integers(0, 10, batch)
    kernels = []
    for i in range(depth):
        fan_out = 10 if i == depth - 1 else width
        if activation == "sigmoid":
            limit = np.sqrt(6 / (width + fan_out))
            kernels.append(rng.uniform(-limit, limit, (width, fan_out)))
        else:
            kernels.append(rng.normal(0, np.sqrt(2 / width), (width, fan_out)))
    outputs, pre = [x], []
    for i, kernel in enumerate(kernels):
        z = outputs[-1] @ kernel
        pre.append(z)
        if i < depth - 1:
            outputs.append(1 / (1 + np.exp(-z)) if activation == "sigmoid" else np.maximum(z, 0))
        else:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            outputs.append(e / e.sum(axis=1, keepdims=True))
    delta = outputs[-1].copy()
    delta[np.arange(batch), labels] -= 1
    delta /= batch
    norms = np.zeros(2 * depth)
    for i in reversed(range(depth)):
        norms[2 * i] = np.linalg.norm(outputs[i].T @ delta)
        norms[2 * i + 1] = np.linalg.norm(delta.sum(axis=0))
        if i:
            back = delta @ kernels[i].T
            if activation == "sigmoid":
                delta = back * outputs[i] * (1 - outputs[i])
            else:
                delta = back * (pre[i - 1] > 0)
    names = [f"dense_{i}/{v}" for i in range(depth) for v in ("kernel", "bias")]
    return names, norms


def test_deep_sigmoid_mlp_vanishes_and_relu_he_does_not():
    rows = {act: [_mlp_gradient_norms(act, seed=s)[1] for s in range(5)]
            for act in ("sigmoid", "relu")}
    names, _ = _mlp_gradient_norms("relu")
    sigmoid = classify({"grad_norm": _stat(rows["sigmoid"], names)})
    relu = classify({"grad_norm": _stat(rows["relu"], names)})
    # The first four sigmoid layers (kernels and biases) sit at 1e-6..3e-4 of the last kernel.
    assert (sigmoid.codes[:, :8] == VANISHING).all()
    assert (sigmoid.codes[:, -6:] == HEALTHY).all()
    assert (relu.codes == HEALTHY).all()  # ratios stay within ~1e-1, biases included
    assert find_episodes(relu) == []


def test_dead_layer_with_zero_gradient_and_all_zero_steps_do_not_crash():
    norms = np.array([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]] * 10)
    result = classify({"grad_norm": _stat(norms)})
    assert (result.codes[0::2, 0] == VANISHING).all()  # 0 of the largest: not learning
    assert (result.codes[1::2] == HEALTHY).all()  # 0/0: no reference, no verdict
    assert result.variables.figures[0, 0] == 0.0


def test_exploding_variable_does_not_make_the_others_vanish():
    rng = np.random.default_rng(1)
    norms = _noisy(rng, (30, 4))
    norms[25, 3] = 1e5
    result = classify({"grad_norm": _stat(norms)})
    assert result.codes[25, 3] == EXPLODING
    assert (result.codes[25, :3] == HEALTHY).all()


# ---------------------------------------------------------------------------
# Exploding


def test_one_step_spike_is_flagged_at_exactly_that_step():
    rng = np.random.default_rng(2)
    norms = _noisy(rng, (60, 5), sigma=0.2)
    norms[40, 2] *= 100
    result = classify({"grad_norm": _stat(norms)})
    exploding = np.argwhere(result.codes == EXPLODING)
    assert exploding.tolist() == [[40, 2]]
    assert RULE(result, 40, 2) == "spike"
    assert result.variables.figures[40, 2] == pytest.approx(100, rel=0.5)
    [episode] = find_episodes(result)
    assert _kinds([episode]) == [("exploding", ("dense_2/kernel",), 40, 40)]
    assert episode.rule == "spike" and episode.threshold == 10


def RULE(result, row, col):
    return detect.RULE_NAMES[result.variables.rules[row, col]]


def test_spike_needs_min_history():
    norms = np.ones((10, 2), np.float32)
    norms[4, 0] = 100.0  # 4 previous records: not enough
    norms[5, 1] = 100.0  # 5 previous records: judged
    result = classify({"grad_norm": _stat(norms)})
    assert result.codes[4, 0] == HEALTHY
    assert result.codes[5, 1] == EXPLODING


def test_spike_baseline_skips_nonfinite_records_and_forgets_old_ones():
    th = Thresholds(baseline_window=5, min_history=3)
    norms = np.ones((30, 2), np.float32)
    norms[10:13, 0] = np.nan  # not part of any baseline
    norms[13, 0] = 50.0  # window rows 8..12: only 2 finite records
    norms[20:, 1] = 20.0  # a lasting rise: flagged until the median catches up
    result = classify({"grad_norm": _stat(norms)}, th)
    assert result.codes[13, 0] == HEALTHY
    rows = np.flatnonzero(result.codes[:, 1] == EXPLODING).tolist()
    assert rows == [20, 21, 22]  # from row 23 on, 3 of the previous 5 records are 20


def test_absolute_norm_and_update_ratio():
    rng = np.random.default_rng(3)
    norms = _noisy(rng, (20, 3), scale=100.0)
    norms[:, 2] *= 20  # steady, but above exploding_norm
    update = np.full((20, 3), 1e-3, np.float32)
    update[2, 0] = 5.0  # before warm-up: zero-initialised variables start like this
    update[12, 1] = 5.0
    result = classify({"grad_norm": _stat(norms), "update_ratio": _stat(update)})
    assert (result.codes[:, 2] == EXPLODING).all()
    assert {RULE(result, r, 2) for r in range(20)} == {"grad_norm"}
    assert result.codes[2, 0] == HEALTHY
    assert result.codes[12, 1] == EXPLODING and RULE(result, 12, 1) == "update_ratio"
    off = classify({"grad_norm": _stat(norms)}, Thresholds(exploding_norm=None))
    assert (off.codes == HEALTHY).all()


def test_norm_overflow_with_finite_values_is_exploding_not_nonfinite():
    norms = np.ones((10, 2), np.float32)
    norms[7, 1] = np.inf  # sum of squares overflowed float32; no NaN/inf counted
    count = np.zeros((10, 2), np.float32)
    result = classify({"grad_norm": _stat(norms), "grad_nonfinite": _stat(count)})
    assert result.codes[7, 1] == EXPLODING


# ---------------------------------------------------------------------------
# Non-finite


def test_nonfinite_count_wins_over_exploding():
    norms = np.ones((10, 3), np.float32)
    norms[8, 0] = 1e6  # would be exploding on its own
    count = np.zeros((10, 3), np.float32)
    count[8, 0] = 12
    result = classify({"grad_norm": _stat(norms), "grad_nonfinite": _stat(count)})
    assert result.codes[8, 0] == NONFINITE
    assert result.codes[8, 1] == HEALTHY
    [episode] = find_episodes(result)
    assert episode.kind == "nonfinite" and episode.figure == 12
    assert "12 NaN/inf values" in episode.message


def test_nan_norm_without_count_is_nonfinite():
    norms = np.ones((4, 2), np.float32)
    norms[2, 1] = np.nan
    result = classify({"grad_norm": _stat(norms)})
    assert result.codes[2, 1] == NONFINITE
    [episode] = find_episodes(result)
    assert np.isnan(episode.figure) and "not finite" in episode.message


def test_undefined_update_ratio_is_not_nonfinite():
    names = ["dense/kernel", "dense/bias"]
    weight_norm = np.array([[3.0, 0.0], [3.0, 0.01]], np.float32)  # zero-initialised bias
    update = np.array([[1e-3, np.nan], [1e-3, 0.5]], np.float32)
    stats = {
        "grad_norm": _stat([[1.0, 0.2], [1.0, 0.2]], names),
        "grad_nonfinite": _stat(np.zeros((2, 2)), names),
        "weight_norm": _stat(weight_norm, names),
        "update_ratio": _stat(update, names),
    }
    result = classify(stats)
    assert (result.codes == HEALTHY).all()
    assert find_episodes(result) == []


# ---------------------------------------------------------------------------
# Layers, stalled updates and the global norm


def test_dead_and_saturated_layers():
    layers = ["dense", "dense_1", "dense_2"]
    dead = np.array([[0.9, 0.0, np.nan]] * 3, np.float32)
    saturated = np.array([[0.0, 0.3, 0.8]] * 3, np.float32)
    result = classify({"dead_fraction": _stat(dead, layers),
                       "saturation_fraction": _stat(saturated, layers)})
    assert result.layer_names == tuple(layers)
    assert (result.layer_codes == [DEAD, HEALTHY, SATURATED]).all()
    assert [CLASS_NAMES[c] for c in result.layer_codes[0]] == ["dead", "healthy", "saturated"]
    dead_episode, saturated_episode = find_episodes(result)
    assert dead_episode.scope == "layer" and dead_episode.names == ("dense",)
    assert dead_episode.figure == pytest.approx(0.9)
    assert "90% of units passed no gradient for a whole batch" in dead_episode.message
    assert saturated_episode.names == ("dense_2",)


def test_dead_layer_names_keep_model_order_when_stats_cover_different_layers():
    dead = _stat(np.zeros((2, 2)), ["conv", "dense"])
    saturation = _stat(np.full((2, 2), 0.9), ["lstm", "dense_out"])
    both = _stat(np.zeros((2, 3)), ["conv", "lstm", "dense"])
    result = classify({"dead_fraction": dead, "saturation_fraction": saturation})
    assert result.layer_names == ("conv", "dense", "lstm", "dense_out")
    result = classify({"dead_fraction": both, "saturation_fraction": saturation})
    assert result.layer_names == ("conv", "lstm", "dense", "dense_out")


def test_stalled_lower_layers_and_float32_resolution():
    update = np.full((10, 6), 1e-3, np.float32)
    update[:100, 0] = 1e-9  # below float32 resolution
    update[:, 1] = 1e-6  # 1e-3 of the upper half's median
    update[5] = 0.0  # a skipped step (loss scaling): nothing moved, not a stall
    result = classify({"update_ratio": _stat(update)})
    assert (result.codes == HEALTHY).all()  # a finding, not a gradient class
    rules = result.updates.rules
    assert {detect.RULE_NAMES[r] for r in rules[:, 0]} == {"below_resolution", ""}
    assert {detect.RULE_NAMES[r] for r in rules[:, 1]} == {"stalled", ""}
    assert (rules[5] == 0).all() and (rules[:, 2:] == 0).all()
    [episode] = find_episodes(result)
    assert episode.kind == "stalled" and episode.rule == "below_resolution"
    assert episode.names == ("dense_0/kernel", "dense_1/kernel")
    assert "below float32 resolution" in episode.message


def test_stalled_judges_kernels_and_biases_only_inform():
    names = [f"dense_{i}/{role}" for i in range(6) for role in ("kernel", "bias")]
    update = np.tile(np.array([1e-3, 0.2] * 6, np.float32), (10, 1))  # young biases move more
    update[:, 3] = 1e-9  # a bias that does not move: not a verdict of its own
    assert find_episodes(classify({"update_ratio": _stat(update, names)})) == []
    update[:, 0] = 1e-6  # the first kernel: 1e-3 of the upper kernels
    [episode] = find_episodes(classify({"update_ratio": _stat(update, names)}))
    assert (episode.rule, episode.names) == ("stalled", ("dense_0/kernel", "dense_0/bias"))


def test_recovering_from_vanishing_is_not_exploding():
    norms = np.ones((40, 3), np.float32)
    norms[:20, 0] = 1e-6  # vanishing, then back to normal at once
    result = classify({"grad_norm": _stat(norms)})
    assert (result.codes[:20, 0] == VANISHING).all()
    assert (result.codes[20:] == HEALTHY).all()


def test_global_norm_reports_only_what_no_variable_explains():
    rng = np.random.default_rng(4)
    norms = _noisy(rng, (20, 4), scale=600.0)
    norms[15, 0] = 5e3  # a variable above exploding_norm explains the global one at step 15
    total = np.linalg.norm(norms, axis=1)  # ~1.2e3 everywhere: over exploding_norm
    result = classify({"grad_norm": _stat(norms), "global_grad_norm": _stat(total)})
    assert (result.global_norm.codes[:, 0] == EXPLODING).all()
    episodes = [e for e in find_episodes(result) if e.scope == "global"]
    assert _kinds(episodes) == [("exploding", ("global_grad_norm",), 0, 19)]  # gap merged
    alone = classify({"global_grad_norm": _stat(total)}, Thresholds(merge_gap=0))
    assert [(e.first_step, e.last_step) for e in find_episodes(alone)] == [(0, 19)]
    result = classify({"grad_norm": _stat(norms), "global_grad_norm": _stat(total)},
                      Thresholds(merge_gap=0))
    ranges = [(e.first_step, e.last_step) for e in find_episodes(result) if e.scope == "global"]
    assert ranges == [(0, 14), (16, 19)]
    assert "the global gradient norm" in find_episodes(alone)[0].message


def test_statistics_on_different_steps_and_names_are_aligned():
    grad = _stat(np.ones((4, 2)), ["a", "b"], steps=[0, 10, 20, 30])
    count = _stat(np.zeros((4, 2)), ["a", "b"], steps=[0, 10, 20, 30])
    update = _stat([[1e-3, 1e-3, 1e-3]] * 2, ["a", "b", "c"], steps=[10, 40])
    result = classify({"grad_norm": grad, "grad_nonfinite": count, "update_ratio": update})
    assert result.steps.tolist() == [0, 10, 20, 30, 40]
    assert result.names == ("a", "b", "c")
    assert (result.codes == HEALTHY).all()


def test_accepts_a_run_like_object():
    class FakeRun:
        def stats(self):
            return ["grad_norm", "weight_norm"]

        def stat(self, name):
            return _stat([[1e-6, 1.0]] * 3, ["a", "b"])

    assert _kinds(find_episodes(classify(FakeRun()))) == [("vanishing", ("a",), 0, 2)]


# ---------------------------------------------------------------------------
# Episodes


def test_episodes_merge_across_small_gaps_only():
    norms = np.ones((40, 3), np.float32)
    norms[0:10, 0] = 1e-5
    norms[13:20, 1] = 1e-6  # 3 healthy records between: same episode by default
    norms[30:32, 0] = 1e-4  # 10 records later: a new one
    result = classify({"grad_norm": _stat(norms)})
    first, second = find_episodes(result)
    assert _kinds([first, second]) == [
        ("vanishing", ("dense_0/kernel", "dense_1/kernel"), 0, 19),
        ("vanishing", ("dense_0/kernel",), 30, 31),
    ]
    assert first.figure == pytest.approx(1e-6)
    split = find_episodes(classify({"grad_norm": _stat(norms)}, Thresholds(merge_gap=2)))
    assert [(e.first_step, e.last_step) for e in split] == [(0, 9), (13, 19), (30, 31)]


def test_episode_reports_the_most_serious_rule_of_its_kind():
    norms = np.ones((30, 2), np.float32)
    norms[20, 0] = 50.0  # spike
    norms[21, 0] = 2e3  # spike and above exploding_norm: the spike wins the cell
    update = np.full((30, 2), 1e-3, np.float32)
    update[22, 1] = 3.0
    result = classify({"grad_norm": _stat(norms), "update_ratio": _stat(update)})
    [episode] = find_episodes(result)
    assert (episode.kind, episode.first_step, episode.last_step) == ("exploding", 20, 22)
    assert episode.rule == "spike" and episode.figure == pytest.approx(2e3)


# ---------------------------------------------------------------------------
# Streaming


def _messy_run(seed=5, steps=300, n=8):
    rng = np.random.default_rng(seed)
    names = _names(n)
    norms = _noisy(rng, (steps, n), sigma=0.4) * np.geomspace(1e-4, 1, n, dtype=np.float32)
    norms[rng.random((steps, n)) < 0.01] *= 300  # spikes
    norms[200:210, 3] = np.nan
    count = np.zeros((steps, n), np.float32)
    count[200:210, 3] = 7
    update = _noisy(rng, (steps, n), 1e-3, sigma=0.5)
    update[:, 0] = 1e-9
    update[50:60, 1] = 1e-7
    update[0, n - 1] = np.nan  # undefined: zero-initialised
    update[rng.random((steps, n)) < 0.005] = 40.0
    layers = ["dense", "dense_1", "dense_2"]
    dead = rng.random((steps, 3)).astype(np.float32) ** 4
    total = np.sqrt(np.nansum(norms**2, axis=1)).astype(np.float32)
    total[100:103] = 5e3
    stats = {
        "grad_norm": (np.arange(steps), names, norms),
        "grad_nonfinite": (np.arange(steps), names, count),
        "update_ratio": (np.arange(steps), names, update),
        "dead_fraction": (np.arange(steps), layers, dead),
        "global_grad_norm": (np.arange(steps), [], total),
    }
    return stats


def _stream(stats, thresholds=None):
    detector = StreamingDetector(thresholds)
    started = []
    for row, step in enumerate(stats["grad_norm"][0]):
        values = {name: (entry[2][row] if entry[2].ndim == 2 else float(entry[2][row]))
                  for name, entry in stats.items()}
        names = {name: entry[1] for name, entry in stats.items()}
        started += detector.observe(int(step), values, names)
    return detector, started


@pytest.mark.parametrize("thresholds", [None, Thresholds(merge_gap=0, baseline_window=7,
                                                         min_history=2)])
def test_streaming_matches_classify(thresholds):
    stats = _messy_run()
    batch = find_episodes(classify(stats, thresholds))
    detector, started = _stream(stats, thresholds)
    streamed = detector.episodes()
    kinds = {e.kind for e in batch}
    assert {"exploding", "vanishing", "nonfinite", "dead", "stalled"} <= kinds
    assert len(streamed) == len(batch) > 5
    for s, b in zip(streamed, batch, strict=True):
        assert (s.kind, s.scope, s.names, s.first_step, s.last_step, s.rule) == (
            b.kind, b.scope, b.names, b.first_step, b.last_step, b.rule)
        np.testing.assert_equal(s.figure, b.figure)
        assert s.message == b.message
    # One warning per episode, when it is reported.
    assert sorted((e.kind, e.scope, e.first_step) for e in started) == sorted(
        (e.kind, e.scope, e.first_step) for e in batch)


def test_observe_returns_an_episode_once_when_it_starts():
    detector = StreamingDetector(Thresholds(merge_gap=1))
    names = {"grad_norm": ["a", "b"]}
    low, ok = {"grad_norm": [1e-6, 1.0]}, {"grad_norm": [1.0, 1.0]}
    sequence = [low, low, ok, low, ok, ok, low, ok, ok, ok, low, ok, low]
    results = [detector.observe(step, v, names) for step, v in enumerate(sequence)]
    # Reported at its second record; step 6 alone is a blip; steps 10 and 12 persist.
    assert [len(r) for r in results] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    first, second = detector.episodes()
    assert (first.first_step, first.last_step) == (0, 3)
    assert (second.first_step, second.last_step) == (10, 12)
    assert results[1][0].last_step == 1  # a snapshot, taken when it was reported


def test_summary():
    detector = StreamingDetector()
    names = {"grad_norm": ["dense/kernel", "dense_1/kernel"], "dead_fraction": ["dense"]}
    assert detector.summary() == ""
    detector.observe(0, {"grad_norm": [1.0, 1.0], "dead_fraction": [0.0]}, names)
    assert detector.summary() == ""
    for step in range(1, 4):
        detector.observe(step, {"grad_norm": [1e-7, 1.0], "dead_fraction": [0.95]}, names)
    summary = detector.summary()
    assert summary.splitlines()[0] == "keras-vg found 2 gradient-health episode(s):"
    assert "Vanishing gradients in layer dense, steps 1-3" in summary
    assert "Dead units in layer dense, steps 1-3: up to 95% of units passed no gradient" in summary
    detector.reset()
    assert detector.summary() == ""


def test_streaming_memory_is_bounded_and_survives_a_model_change():
    detector = StreamingDetector(Thresholds(baseline_window=4, min_history=2))
    for step in range(100):
        detector.observe(step, {"grad_norm": [1.0, 1.0]}, {"grad_norm": ["a", "b"]})
    assert detector._history.shape == (2, 4)
    # A second fit on a grown model: "a" keeps its baseline, "c" starts afresh.
    started = detector.observe(100, {"grad_norm": [500.0, 1.0, 500.0]},
                               {"grad_norm": ["a", "b", "c"]})
    assert _kinds(started) == [("exploding", ("a",), 100, 100)]  # 500x: extreme on one record


# ---------------------------------------------------------------------------
# Batches: observe_many against observe, record by record


def _varied_run(seed=7, steps=240, n=12):
    """Every kind of finding, at irregular steps, with episodes of all lengths.

    Returns `(steps [T], values, names)` as `observe_many` takes them; the
    findings are planted in 240 records, of which the first `steps` are kept.
    """
    rng = np.random.default_rng(seed)
    steps, kept = 240, steps
    names = [f"dense_{i // 2}/{('kernel', 'bias')[i % 2]}" for i in range(n)]
    norms = _noisy(rng, (steps, n), sigma=0.4) * np.geomspace(1e-4, 1, n, dtype=np.float32)
    norms[5:][rng.random((steps - 5, n)) < 0.01] *= 300  # spikes after warm-up
    norms[60:75, n - 3] *= 1e-5  # a variable vanishing for a while
    norms[150:170, 4] = 0.0  # a dead variable: zero gradient
    norms[120:124, 2] = np.nan
    count = np.zeros((steps, n), np.float32)
    count[120:124, 2] = 5
    count[200, 7] = 1  # a lone NaN/inf count with a finite norm
    update = _noisy(rng, (steps, n), 1e-3, sigma=0.5)
    update[:100, 0] = 1e-9  # below float32 resolution
    update[150:162, 2] = 1e-6  # stalled
    update[0, 1::2] = np.nan  # zero-initialised biases
    update[rng.random((steps, n)) < 0.005] = 40.0  # extreme: an episode on one record
    layers = ["dense", "dense_1", "dense_2", "dense_3"]
    dead = rng.random((steps, 4)).astype(np.float32) ** 4
    dead[30:90, 1] = 0.8  # a dead layer
    saturation = rng.random((steps, 4)).astype(np.float32) ** 6
    saturation[100:103, 3] = 0.9
    total = np.sqrt(np.nansum(norms**2, axis=1)).astype(np.float32)
    total[100:103] = 5e3  # global spikes no variable explains
    total[180] = np.inf
    skipped = np.zeros(steps, np.float32)
    skipped[[120, 121, 180]] = 1  # AutoClip skipped the non-finite steps
    update[[120, 121, 180]] = 0.0  # and applied no update there
    step_numbers = np.cumsum(rng.integers(1, 4, steps))  # irregular recorded steps
    values = {"grad_norm": norms, "grad_nonfinite": count, "update_ratio": update,
              "dead_fraction": dead, "saturation_fraction": saturation,
              "global_grad_norm": total, "skipped": skipped}
    step_numbers, values = step_numbers[:kept], {s: v[:kept] for s, v in values.items()}
    names = {"grad_norm": names, "grad_nonfinite": names, "update_ratio": names,
             "dead_fraction": layers, "saturation_fraction": layers, "global_grad_norm": [],
             "skipped": []}
    return step_numbers, values, names


def _one_by_one(detector, steps, values, names):
    started = []
    for t, step in enumerate(steps):
        row = {s: (float(v[t]) if v.ndim == 1 else v[t]) for s, v in values.items()}
        started += detector.observe(int(step), row, names)
    return started


def _in_batches(detector, steps, values, names, sizes):
    started, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        started += detector.observe_many(steps[rows], {s: v[rows] for s, v in values.items()},
                                         names)
        start += size
    assert start >= len(steps)
    return started


def _assert_same_episodes(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert (g.kind, g.scope, g.names, g.first_step, g.last_step, g.rule, g.threshold,
                g.message) == (e.kind, e.scope, e.names, e.first_step, e.last_step, e.rule,
                               e.threshold, e.message)
        np.testing.assert_equal(g.figure, e.figure)  # NaN where unknown


def _assert_same_state(got, expected):
    _assert_same_episodes(got.episodes(), expected.episodes())
    assert got.summary(max_lines=100) == expected.summary(max_lines=100)
    assert got._names == expected._names and got._rows == expected._rows
    assert got._slot == expected._slot
    np.testing.assert_array_equal(got._history, expected._history)
    np.testing.assert_array_equal(got._tops, expected._tops)


def _ragged(seed, total):
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.choice([1, 2, 3, 5, 17, 50, 64])))
    return sizes


def test_varied_run_has_every_finding_for_the_batch_tests():
    steps, values, names = _varied_run()
    detector = StreamingDetector()
    _one_by_one(detector, steps, values, names)
    episodes = detector.episodes()
    assert {e.kind for e in episodes} == set(detect.KINDS)
    assert {e.scope for e in episodes} == set(detect.SCOPES)
    assert {e.rule for e in episodes} >= {"nonfinite", "spike", "grad_norm", "update_ratio",
                                          "vanishing", "dead", "saturated", "stalled",
                                          "below_resolution"}
    # Episodes longer than a batch of 3 and ones crossing every batch boundary of 50.
    boundaries = steps[49::50]
    assert any(e.first_step <= b < e.last_step for e in episodes for b in boundaries)
    assert max(np.searchsorted(steps, e.last_step) - np.searchsorted(steps, e.first_step)
               for e in episodes) > 50


@functools.cache
def _record_by_record(thresholds):
    """`observe` on each record of `_varied_run()`: the detector and what it returned."""
    detector = StreamingDetector(thresholds)
    return detector, _one_by_one(detector, *_varied_run())


@pytest.mark.parametrize("sizes", [
    "whole", [1] * 240, [3] * 80, [50] * 5, "ragged0", "ragged1", [239, 1], [1, 239],
])
@pytest.mark.parametrize("thresholds", [
    None,
    Thresholds(merge_gap=0, baseline_window=7, min_history=2),
    Thresholds(merge_gap=3, baseline_window=3, min_history=3, exploding_update_ratio=None),
])
def test_observe_many_matches_observe_record_by_record(sizes, thresholds):
    steps, values, names = _varied_run()
    if sizes == "whole":
        sizes = [len(steps)]
    elif isinstance(sizes, str):
        sizes = _ragged(int(sizes[-1]), len(steps))
    single, expected = _record_by_record(thresholds)
    single = copy.deepcopy(single)
    batched = StreamingDetector(thresholds)
    started = _in_batches(batched, steps, values, names, sizes)
    assert len(expected) > 10
    _assert_same_episodes(started, expected)
    _assert_same_state(batched, single)
    # Later calls, one way or the other, agree too.
    more_steps, more, _ = _varied_run(seed=8, steps=30)
    more_steps = more_steps + steps[-1]
    expected = _one_by_one(single, more_steps, more, names)
    _assert_same_episodes(batched.observe_many(more_steps, more, names), expected)
    _assert_same_state(batched, single)


def test_observe_many_with_statistics_and_names_changing_between_batches():
    steps, values, names = _varied_run(steps=120)
    rng = np.random.default_rng(9)
    single, batched = StreamingDetector(), StreamingDetector()
    expected, started, start = [], [], 0
    for size in _ragged(3, 120):
        rows = slice(start, start + size)
        batch = {s: v[rows] for s, v in values.items() if rng.random() > 0.2}
        batch_names = dict(names)
        if rng.random() < 0.3:  # the model lost its first layer, or a statistic some names
            for stat in detect.VARIABLE_STATS:
                if stat in batch:
                    batch[stat], batch_names[stat] = batch[stat][:, 2:], names[stat][2:]
        if rng.random() < 0.3 and "update_ratio" in values:
            batch["update_ratio"] = values["update_ratio"][rows, 4:]
            batch_names["update_ratio"] = names["update_ratio"][4:]
        expected += _one_by_one(single, steps[rows], batch, batch_names)
        started += batched.observe_many(steps[rows], batch, batch_names)
        start += size
    assert len(expected) > 5
    _assert_same_episodes(started, expected)
    _assert_same_state(batched, single)


def test_episode_spanning_batches_is_returned_once_in_the_batch_where_it_is_reported():
    names = {"grad_norm": ["a/kernel", "b/kernel"]}
    low, ok = [1e-6, 1.0], [1.0, 1.0]
    rows = np.array([ok] * 4 + [low] * 8 + [ok] * 3 + [low] * 2 + [ok] * 8 + [low] * 2, np.float32)
    detector = StreamingDetector(Thresholds(merge_gap=2))
    started = [detector.observe_many(np.arange(5 * i, 5 * i + 5), {"grad_norm": rows[5 * i:5 * i + 5]},
                                     names) for i in range(5)]
    started.append(detector.observe_many([25, 26], {"grad_norm": rows[25:]}, names))
    # Row 4 opens a candidate in the first batch; its second record, in the next batch, reports it.
    assert [_kinds(s) for s in started] == [
        [], [("vanishing", ("a/kernel",), 4, 5)], [], [("vanishing", ("a/kernel",), 15, 16)], [],
        [("vanishing", ("a/kernel",), 25, 26)]]
    # Rows 4-11 and 15-16 are 3 healthy records apart: more than merge_gap=2.
    assert [(e.first_step, e.last_step) for e in detector.episodes()] == [(4, 11), (15, 16), (25, 26)]
    # With merge_gap=3 the gap of rows 12-14, across the batch boundary, is bridged.
    detector = StreamingDetector(Thresholds(merge_gap=3))
    detector.observe_many(np.arange(13), {"grad_norm": rows[:13]}, names)
    started = detector.observe_many(np.arange(13, 27), {"grad_norm": rows[13:]}, names)
    assert _kinds(started) == [("vanishing", ("a/kernel",), 25, 26)]
    assert [(e.first_step, e.last_step) for e in detector.episodes()] == [(4, 16), (25, 26)]


def test_observe_many_on_one_record_empty_batches_and_no_variables():
    steps, values, names = _varied_run(steps=40)
    single, batched = StreamingDetector(), StreamingDetector()
    expected = _one_by_one(single, steps, values, names)
    started = []
    for t in range(40):
        started += batched.observe_many(steps[t:t + 1], {s: v[t:t + 1] for s, v in values.items()},
                                        names)
        assert batched.observe_many([], {s: v[:0] for s, v in values.items()}, names) == []
    _assert_same_episodes(started, expected)
    _assert_same_state(batched, single)
    empty = StreamingDetector()
    none = {"grad_norm": np.zeros((3, 0)), "dead_fraction": np.zeros((3, 0))}
    assert empty.observe_many([0, 1, 2], none, {"grad_norm": [], "dead_fraction": []}) == []
    assert empty._rows == {"variable": 2, "layer": 2, "global": -1}


def test_observe_many_runs_on_200_records_of_1000_variables():
    rng = np.random.default_rng(10)
    names = _names(1000)
    norms = _noisy(rng, (200, 1000), sigma=0.3) * np.geomspace(1e-5, 1, 1000, dtype=np.float32)
    norms[150, 700] *= 1e3
    stats = {
        "grad_norm": norms,
        "grad_nonfinite": np.zeros((200, 1000), np.float32),
        "update_ratio": _noisy(rng, (200, 1000), 1e-3, sigma=0.5),
        "global_grad_norm": np.linalg.norm(norms, axis=1),
    }
    detector = StreamingDetector()
    started = detector.observe_many(np.arange(200), stats, {s: names for s in stats})
    spikes = [e for e in started if e.kind == "exploding"]
    assert _kinds(spikes) == [("exploding", ("dense_700/kernel",), 150, 150)]
    [vanishing] = [e for e in started if e.kind == "vanishing"]
    assert vanishing.first_step == 0 and len(vanishing.names) > 200
    expected = find_episodes(classify({s: (np.arange(200), names if v.ndim == 2 else [], v)
                                       for s, v in stats.items()}))
    _assert_same_episodes(detector.episodes(), expected)


# ---------------------------------------------------------------------------
# Layers along depth: kernels carry the verdict


def _layered(n_layers, roles=("kernel", "bias")):
    return [f"dense_{i}/{role}" for i in range(n_layers) for role in roles]


def test_a_layer_is_judged_by_its_kernels_and_its_variables_share_the_verdict():
    names = _layered(4)
    norms = np.tile(np.array([1.0, 1e-9] * 4, np.float32), (10, 1))  # biases ~0, kernels healthy
    result = classify({"grad_norm": _stat(norms, names)})
    assert (result.codes == HEALTHY).all() and find_episodes(result) == []
    norms[:, 0] = 1e-6  # the first layer's kernel vanishes: its bias shares the verdict
    result = classify({"grad_norm": _stat(norms, names)})
    assert (result.codes[:, :2] == VANISHING).all() and (result.codes[:, 2:] == HEALTHY).all()
    [episode] = find_episodes(result)
    assert episode.names == ("dense_0/kernel", "dense_0/bias")
    assert "Vanishing gradients in layer dense_0, steps 0-9" in episode.message


def test_vanishing_compares_a_layer_with_the_layers_above_it_only():
    # Below BatchNormalization the input side often has the largest gradients: that is no vanishing.
    falling = np.tile(np.float32([1.0, 0.1, 1e-2, 1e-4, 1e-5]), (10, 1))
    assert find_episodes(classify({"grad_norm": _stat(falling)})) == []
    [episode] = find_episodes(classify({"grad_norm": _stat(falling[:, ::-1])}))
    assert (episode.kind, episode.names) == ("vanishing", ("dense_0/kernel", "dense_1/kernel"))
    assert episode.figure == pytest.approx(1e-5)
    assert "down to 1e-05 of the largest among the layers above" in episode.message


def test_a_layer_norm_is_the_root_sum_of_squares_of_its_kernels():
    names = ["lstm/cell/kernel", "lstm/cell/recurrent_kernel", "lstm/cell/bias", "dense/kernel", "dense/bias"]
    rng = np.random.default_rng(11)
    norms = _noisy(rng, (30, 5))
    norms[:, 0] = 1e-7  # the input kernel alone is tiny; the recurrent kernel carries the layer
    structure = detect.Structure(names)
    assert structure.units == ("lstm/cell", "dense")
    expected = np.sqrt(norms[:, 0].astype(np.float64) ** 2 + norms[:, 1] ** 2)
    np.testing.assert_allclose(structure.unit_norms(norms)[:, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(structure.unit_norms(norms)[:, 1], norms[:, 3])
    assert (classify({"grad_norm": _stat(norms, names)}).codes == HEALTHY).all()


def test_a_layer_update_ratio_is_taken_over_its_kernels_together():
    names = ["gru/kernel", "gru/recurrent_kernel", "gru/bias"]
    rng = np.random.default_rng(12)
    update = _noisy(rng, (6, 3), 1e-3, sigma=1.0)
    update[0, 1] = np.nan  # undefined (zero weights): left out
    weight = _noisy(rng, (6, 3), 5.0, sigma=1.0)
    got = detect.Structure(names).unit_updates(update, weight)[:, 0]
    r, w = update[:, :2].astype(np.float64), weight[:, :2].astype(np.float64)
    w = np.where(np.isnan(r), 0.0, w)
    expected = np.sqrt(np.nansum((r * w) ** 2, axis=1)) / np.sqrt(np.sum(w**2, axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Without weight norms, the larger kernel ratio stands in.
    np.testing.assert_allclose(detect.Structure(names).unit_updates(update, None)[:, 0],
                               np.fmax(update[:, 0], update[:, 1]))


def test_the_update_ratio_rule_ignores_biases_and_norm_offsets():
    names = ["dense/kernel", "dense/bias", "bn/gamma", "bn/beta", "out/kernel", "out/bias"]
    norms = np.ones((20, 6), np.float32)
    update = np.full((20, 6), 1e-3, np.float32)
    update[10:, [1, 3, 5]] = 50.0  # zero-initialised offsets growing from 0: huge ratios, tiny steps
    result = classify({"grad_norm": _stat(norms, names), "update_ratio": _stat(update, names)})
    assert (result.codes == HEALTHY).all() and find_episodes(result) == []
    update[12, 4] = 50.0  # the output kernel changed by 50x its norm: that is an explosion
    result = classify({"grad_norm": _stat(norms, names), "update_ratio": _stat(update, names)})
    [episode] = find_episodes(result)
    assert (episode.kind, episode.rule, episode.names) == ("exploding", "update_ratio", ("out/kernel", "out/bias"))
    assert (episode.first_step, episode.last_step) == (12, 12)  # 50x the threshold: extreme


def test_a_zero_initialised_kernel_growing_from_zero_is_not_exploding():
    # Adam-like growth from 0: |w_k| = k * lr after k steps, each step lr: the ratio is 1/k, huge at first.
    names = ["gate/kernel", "dense/kernel"]
    steps = np.arange(40)
    update = np.stack([np.where(steps == 0, np.nan, 1.0 / np.maximum(steps, 1)), np.full(40, 1e-3)], axis=1)
    norms = np.ones((40, 2), np.float32)
    result = classify({"grad_norm": _stat(norms, names), "update_ratio": _stat(update, names)})
    assert find_episodes(result) == []  # judged only after min_history records, when 1/k is small
    for every in (10, 50):  # coarser cadences see it grown already: 1/10, 1/50
        kept = steps % every == 0
        sub = {"grad_norm": _stat(norms[kept], names, steps[kept]),
               "update_ratio": _stat(update[kept], names, steps[kept])}
        assert find_episodes(classify(sub)) == []


def _summary(layers, structural=(), outputs=()):
    return {"layers": [{"name": name, "activation": activation, "variables": [f"m/{name}/{v}" for v in variables],
                        "roles": [detect.variable_role(v) for v in variables]}
                       for name, activation, variables in layers],
            "structural_zeros": [{"variable": v, "layer": v.split("/")[1], "reason": "batch_norm_follows",
                                  "by": "bn"} for v in structural],
            "outputs": list(outputs)}


def test_structural_zeros_get_no_verdict_and_are_reported_as_information():
    model = _summary([("dense", None, ("kernel", "bias")), ("bn", None, ("gamma", "beta")),
                      ("out", "softmax", ("kernel", "bias"))], structural=["m/dense/bias"], outputs=["out"])
    names = model["layers"][0]["variables"] + model["layers"][1]["variables"] + model["layers"][2]["variables"]
    norms = np.tile(np.array([1e-6, 1e-14, 0.5, 0.5, 1.0, 1e-9], np.float32), (10, 1))
    result = classify({"grad_norm": _stat(norms, names)}, model=model)
    # The dense layer vanishes (its kernel); its bias, zero by construction, gets no verdict.
    assert [CLASS_NAMES[c] for c in result.codes[0]] == ["vanishing", "healthy"] + ["healthy"] * 4
    zeros = detect.zero_gradients({"grad_norm": _stat(norms, names)}, model=model)
    # From the summary (with the records' figure), and from the records alone: out/bias stays ~0.
    assert [(z["variable"], z["reason"]) for z in zeros] == [("m/dense/bias", "batch_norm_follows"),
                                                            ("m/out/bias", None)]
    assert zeros[0]["ratio"] == pytest.approx(1e-8, rel=1e-3)
    assert zeros[1]["ratio"] == pytest.approx(1e-9, rel=1e-3)
    # Where the summary read the graph and names no reason, a tiny ratio is no zero by construction
    # (an exploding layer's huge inputs make its bias's gradient tiny beside its kernel's).
    for entry in model["layers"]:
        entry["inbound"] = []
    zeros = detect.zero_gradients({"grad_norm": _stat(norms, names)}, model=model)
    assert [z["variable"] for z in zeros] == ["m/dense/bias"]


def test_leaky_units_are_never_dead_and_an_output_layer_is_never_saturated():
    model = _summary([("a", "relu", ()), ("b", "leaky_relu", ()), ("c", "prelu", ()), ("d", "sigmoid", ()),
                      ("out", "sigmoid", ())], outputs=["out"])
    dead = _stat(np.full((4, 3), 0.9), ["a", "b", "c"])
    saturation = _stat(np.full((4, 2), 0.9), ["d", "out"])
    result = classify({"dead_fraction": dead, "saturation_fraction": saturation}, model=model)
    assert [CLASS_NAMES[c] for c in result.layer_codes[0]] == ["dead", "healthy", "healthy", "saturated",
                                                                "healthy"]
    # Without a summary there is nothing to tell them apart by.
    assert (classify({"dead_fraction": dead}).layer_codes == DEAD).all()
    # The streaming detector applies the same guards once it has the summary.
    detector = StreamingDetector(model=model)
    detector.observe_many(np.arange(4), {"dead_fraction": dead[2], "saturation_fraction": saturation[2]},
                          {"dead_fraction": dead[1], "saturation_fraction": saturation[1]})
    assert [(e.kind, e.names) for e in detector.episodes()] == [("dead", ("a",)), ("saturated", ("d",))]


# ---------------------------------------------------------------------------
# Persistence: one record is a blip unless it is extreme


@pytest.mark.parametrize("rows, factor, reported", [
    ([40], 20.0, False),  # a 20x spike on one record: a blip
    ([40, 43], 20.0, True),  # twice within merge_gap: an episode
    ([40, 50], 20.0, False),  # twice, 10 records apart: two blips
    ([40], 200.0, True),  # 200x, twenty times the threshold of 10x: extreme on one record
])
def test_a_one_record_blip_is_not_an_episode_unless_extreme(rows, factor, reported):
    norms = np.ones((60, 3), np.float32)
    norms[rows, 1] *= factor
    result = classify({"grad_norm": _stat(norms)})
    assert (result.codes[rows, 1] == EXPLODING).all()  # the cells are marked either way
    episodes = find_episodes(result)
    assert [(e.kind, e.first_step) for e in episodes] == ([("exploding", rows[0])] if reported else [])


def test_one_nonfinite_record_is_an_episode_and_one_dead_record_is_not():
    count = np.zeros((10, 2), np.float32)
    count[4, 0] = 1
    dead = np.zeros((10, 1), np.float32)
    dead[6, 0] = 0.9
    episodes = find_episodes(classify({"grad_nonfinite": _stat(count), "dead_fraction": _stat(dead, ["d"])}))
    assert [(e.kind, e.first_step, e.last_step) for e in episodes] == [("nonfinite", 4, 4)]


def test_skipped_steps_are_an_episode_of_their_own_and_never_a_stall():
    names = _layered(6, ("kernel",))
    update = np.full((30, 6), 1e-3, np.float32)
    skipped = np.zeros(30, np.float32)
    skipped[[10, 11, 15]] = [1, 1, 2]  # the record at step 15 counts two skipped steps
    update[[10, 11, 15], :3] = 0.0  # no update where AutoClip skipped the step ...
    update[[10, 11, 15], 3:] = 1e-3  # ... though another process (weight decay) moved the upper layers
    stats = {"update_ratio": _stat(update, names), "skipped": _stat(skipped)}
    episodes = find_episodes(classify(stats))
    assert [(e.kind, e.first_step, e.last_step, e.figure) for e in episodes] == [("skipped", 10, 15, 4.0)]
    assert episodes[0].message == ("Steps skipped by AutoClip, steps 10-15: 4 steps with a non-finite gradient "
                                   "were not applied.")
    without = find_episodes(classify({"update_ratio": _stat(update, names)}))
    assert {e.kind for e in without} == {"stalled"}  # what the skipped steps would look like otherwise


# ---------------------------------------------------------------------------
# The rolling statistics against brute force


def _brute_force_rules(norms, th):
    """Every cell's rule on single-kernel layers, by loops over cells and `np.median`."""
    T, N = norms.shape
    finite = np.where(np.isfinite(norms), norms, np.nan)
    top = np.array([np.nanmax(row) if np.isfinite(row).any() else np.nan for row in finite])
    rules = np.zeros((T, N), np.int64)
    exploding = np.zeros((T, N), bool)
    floor = np.full(N, np.nan)  # the largest window minimum so far: the level each layer has held
    for t in range(T):
        for j in range(N):
            value = norms[t, j]
            window = norms[max(0, t - th.baseline_window):t, j]
            seen = window[~np.isnan(window)]
            if seen.size and np.isfinite(seen.min()):
                floor[j] = np.fmax(floor[j], seen.min())
            if not np.isfinite(value):
                continue
            tops = top[max(0, t - th.baseline_window):t]
            usable = window[np.isfinite(window) & ~(window < th.vanishing_ratio * tops)]
            median = np.fmax(np.median(usable) if usable.size else np.nan, floor[j])
            median = np.nan if usable.size < th.min_history else median
            if (median > 0 and value > th.spike_factor * median
                    and not value < th.vanishing_ratio * top[t]):
                rules[t, j], exploding[t, j] = detect.RULE_NAMES.index("spike"), True
            elif value > th.exploding_norm:
                rules[t, j], exploding[t, j] = detect.RULE_NAMES.index("grad_norm"), True
    for t in range(T):
        for j in range(N):
            # Vanishing: against the largest of the layers above (after it in model order).
            above = [norms[t, k] for k in range(j + 1, N) if np.isfinite(norms[t, k]) and not exploding[t, k]]
            reference = max(above) if above else np.nan
            if not np.isfinite(norms[t, j]):
                rules[t, j] = detect.RULE_NAMES.index("nonfinite")
            elif not exploding[t, j] and norms[t, j] < th.vanishing_ratio * reference:
                rules[t, j] = detect.RULE_NAMES.index("vanishing")
    return rules


def _runs(rows):
    """`(first, last)` of each run of consecutive row numbers."""
    rows = np.asarray(rows)
    if not rows.size:
        return []
    breaks = np.flatnonzero(np.diff(rows) > 1)
    return list(zip(rows[np.r_[0, breaks + 1]].tolist(), rows[np.r_[breaks, len(rows) - 1]].tolist()))


@pytest.mark.parametrize("seed", range(4))
def test_rolling_statistics_match_a_brute_force_computation_on_random_sequences(seed):
    rng = np.random.default_rng(seed)
    window = int(rng.integers(2, 12))
    th = Thresholds(baseline_window=window, min_history=int(rng.integers(1, window + 1)), merge_gap=0,
                    min_records=1, exploding_norm=float(rng.choice([30.0, 1e3])))
    T, N = 150, 6
    norms = (rng.lognormal(0.0, 1.5, (T, N)) * np.geomspace(1e-4, 1.0, N)[rng.permutation(N)]).astype(np.float32)
    norms[rng.random((T, N)) < 0.03] *= 1e3  # spikes
    norms[rng.random((T, N)) < 0.03] = np.nan
    norms[rng.random((T, N)) < 0.01] = np.inf
    names = _names(N)
    expected = _brute_force_rules(norms, th)
    np.testing.assert_array_equal(classify({"grad_norm": _stat(norms, names)}, th).variables.rules, expected)

    # The streaming detector, fed in random batches, keeps the last records and finds the same runs.
    detector, start = StreamingDetector(th), 0
    for size in _ragged(seed, T):
        rows = slice(start, min(start + size, T))
        detector.observe_many(np.arange(T)[rows], {"grad_norm": norms[rows]}, {"grad_norm": names})
        start += size
    kept = detector._history[:, (detector._slot + np.arange(window)) % window].T
    np.testing.assert_array_equal(kept, norms[-window:])
    for kind in ("nonfinite", "exploding", "vanishing"):
        low, high = detect._KIND_IDS[kind]
        hit_rows = np.flatnonzero(((expected >= low) & (expected <= high)).any(axis=1))
        got = [(e.first_step, e.last_step) for e in detector.episodes() if e.kind == kind]
        assert got == _runs(hit_rows), kind


def test_nanmedian_and_previous_minimum_match_numpy_on_random_arrays():
    rng = np.random.default_rng(13)
    x = rng.lognormal(0.0, 2.0, (200, 9)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[rng.random(x.shape) < 0.05] = np.inf
    x[5] = np.nan  # a row with nothing finite: no median
    median, count = detect._nanmedian_rows(x)
    for row, m, c in zip(x, median, count):
        finite = row[np.isfinite(row)]
        assert c == finite.size
        np.testing.assert_allclose(m, np.median(finite) if finite.size else np.nan, rtol=1e-6)
    for window in (1, 3, 7, 20, 250):
        got = detect._previous_min(np.where(np.isinf(x), np.nan, x), window)
        for t in range(len(x)):
            previous = x[max(0, t - window):t]
            previous = np.where(np.isinf(previous), np.nan, previous)
            want = np.full(x.shape[1], np.inf, np.float32) if not len(previous) else np.fmin.reduce(previous)
            np.testing.assert_array_equal(got[t], want)


# ---------------------------------------------------------------------------
# Thresholds


@pytest.mark.parametrize("field, value, constraint", [
    ("vanishing_ratio", 2, "in (0, 1)"),
    ("vanishing_ratio", 0, "in (0, 1)"),
    ("spike_factor", 1, "a finite number > 1"),
    ("baseline_window", 0, "an integer >= 1"),
    ("baseline_window", 2.5, "an integer >= 1"),
    ("exploding_norm", -1, "> 0 or None"),
    ("exploding_update_ratio", float("nan"), "> 0 or None"),
    ("dead_fraction", 1.5, "in (0, 1]"),
    ("saturation_fraction", 0, "in (0, 1]"),
    ("stalled_ratio", 1, "in (0, 1) or None"),
    ("resolution_ratio", 0, "in (0, 1) or None"),
    ("merge_gap", -1, "an integer >= 0"),
    ("merge_gap", True, "an integer >= 0"),
])
def test_threshold_validation_names_the_argument(field, value, constraint):
    with pytest.raises(ValueError) as error:
        Thresholds(**{field: value})
    assert str(error.value) == f"`{field}` must be {constraint}. Received: {field}={value!r}"


def test_min_history_must_fit_the_window():
    with pytest.raises(ValueError, match=r"Received: min_history=30, baseline_window=20"):
        Thresholds(min_history=30)
    assert Thresholds(min_history=3, baseline_window=3).min_history == 3
    with pytest.raises(TypeError, match="thresholds"):
        classify({}, thresholds={"vanishing_ratio": 1e-4})


def test_empty_input():
    result = classify({})
    assert result.codes.shape == (0, 0) and find_episodes(result) == []


# ---------------------------------------------------------------------------
# Scale (timing lives in benchmarks/, this only checks it runs)


def test_classify_1000_variables_by_20000_steps():
    rng = np.random.default_rng(6)
    norms = rng.random((20000, 1000), dtype=np.float32) + 0.5
    norms[12345, 678] *= 1000
    result = classify({"grad_norm": (np.arange(20000), _names(1000), norms)})
    assert result.codes.shape == (20000, 1000)
    assert result.codes[12345, 678] == EXPLODING
