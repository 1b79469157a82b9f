"""The diagnosis (keras_vg.diagnosis, Run.diagnose): findings mapped to layers, remedies fitted to the model.

Two kinds of runs: event files from small models trained here (models that are
not in examples/), and synthetic event files written with the EventWriter,
whose figures are chosen so that exactly one rule fires.
"""

import numpy as np
import pytest

import keras_vg
from keras_vg import detect
from keras_vg import format as fmt
from keras_vg.diagnosis import Diagnosis, Finding, diagnose, first_last_ratio, remedies_for
from keras_vg.event_writer import EventWriter
from keras_vg.reader import read_run


def _layer(name, cls="Dense", activation="relu", init="HeNormal", variables=None):
    return {"name": name, "class": cls, "activation": activation, "kernel_initializer": init,
            "variables": variables if variables is not None else [f"m/{name}/kernel", f"m/{name}/bias"]}


def _summary(layers, optimizer="SGD", **flags):
    classes = {entry["class"] for entry in layers}
    return {"name": "m", "optimizer": optimizer, "layers": layers,
            "has_batch_norm": "BatchNormalization" in classes, "has_residual_add": "Add" in classes,
            "recurrent": sorted(c for c in classes if c in {"SimpleRNN", "LSTM", "GRU"}), **flags}


def write_run(path, stats, model=None, events=None):
    """Writes `stats` (name -> (names, values [T, N]) or values [T]) at steps 0..T-1."""
    writer = EventWriter(path)
    if model is not None:
        writer.write_json(fmt.MODEL_NAME, 0, model)
    first = next(iter(stats.values()))
    for step in range(len(first[1] if isinstance(first, tuple) else first)):
        record = {}
        for name, value in stats.items():
            names, values = value if isinstance(value, tuple) else (None, value)
            record[name] = (values[step], names)
        writer.write_record(step, record)
    if events:
        writer.write_json(fmt.EVENTS_NAME, events[0]["step"], events)
    writer.close()
    return read_run(path)


def _healthy_norms(T, N, seed=0):
    return np.random.RandomState(seed).lognormal(0.0, 0.1, (T, N)).astype(np.float32)


def _keys(finding):
    return [remedy.key for remedy in finding.remedies]


# ---------------------------------------------------------------------------
# Runs of models trained here.


@pytest.fixture(scope="module")
def tanh_run(tmp_path_factory):
    """A deep tanh MLP with a too-small fixed-stddev init: the textbook 'poor init' vanishing."""
    import keras

    keras.utils.set_random_seed(0)
    log_dir = tmp_path_factory.mktemp("tanh") / "run"
    rng = np.random.RandomState(0)
    x = rng.randn(256, 16).astype("float32")
    y = (x[:, :2].sum(axis=1) > 0).astype("float32")
    inputs = keras.Input((16,))
    h = inputs
    for i in range(8):
        h = keras.layers.Dense(32, activation="tanh", name=f"hidden_{i}",
                               kernel_initializer=keras.initializers.RandomNormal(stddev=0.02))(h)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0)])
    keras.backend.clear_session()
    return read_run(log_dir)


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    """The remedies applied: ReLU + He, BatchNormalization and residual additions, Adam."""
    import keras

    keras.utils.set_random_seed(0)
    log_dir = tmp_path_factory.mktemp("fixed") / "run"
    rng = np.random.RandomState(0)
    x = rng.randn(256, 16).astype("float32")
    y = (x[:, :2].sum(axis=1) > 0).astype("float32")
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, kernel_initializer="he_normal", name="stem")(inputs)
    for i in range(2):
        branch = keras.layers.Dense(32, use_bias=False, kernel_initializer="he_normal", name=f"dense_{i}")(h)
        branch = keras.layers.BatchNormalization(name=f"bn_{i}")(branch)
        branch = keras.layers.ReLU(name=f"relu_{i}")(branch)
        h = keras.layers.Add(name=f"add_{i}")([h, branch])
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0)])
    keras.backend.clear_session()
    return read_run(log_dir)


@pytest.mark.fit
def test_poor_init_tanh_net_is_diagnosed_as_vanishing_in_its_lower_layers(tanh_run):
    diagnosis = tanh_run.diagnose()
    assert isinstance(diagnosis, Diagnosis)
    vanishing = [f for f in diagnosis.findings if f.kind == "vanishing"]
    assert vanishing, str(diagnosis)
    finding = vanishing[0]
    assert isinstance(finding, Finding)
    # Layers, not variables; the input side, in model order, and never the head.
    assert finding.layers[:4] == ("hidden_0", "hidden_1", "hidden_2", "hidden_3")
    assert finding.activations[0] == "tanh" and finding.initializers[0] == "random_normal"
    # Two steps in, once the head's gradient has grown from the tiny signal: kernels decide, biases inform.
    assert finding.first_step <= 2 and finding.ongoing
    # The measured figure and its threshold are detect's, unchanged.
    assert finding.rule == "vanishing" and finding.threshold == detect.Thresholds().vanishing_ratio
    assert finding.figure < finding.threshold
    assert finding.first_last_ratio < 1e-3 and diagnosis.first_last_ratio < 1e-3
    # Remedies for this model: scaled init (its init is the cause), ReLU + He for tanh, BN, residual.
    keys = _keys(finding)
    assert keys[:2] == ["scaled_init", "relu_he"]
    assert {"batch_norm", "residual"} <= set(keys)
    assert "gating" not in keys and "clipping" not in keys
    text = str(diagnosis)
    assert f"layers hidden_0..{finding.layers[-1]} (tanh, " in text
    assert "random_normal" in text and f"gradients vanish from step {finding.first_step} on; first/last norm ratio" \
        in text
    assert "Remedies for this model: an initialiser scaled to the layer's width instead of random_normal" in text


@pytest.mark.fit
def test_findings_are_detects_episodes(tanh_run):
    episodes = detect.find_episodes(detect.classify(tanh_run))
    findings = tanh_run.diagnose().findings
    assert [f.episode for f in findings] == episodes
    assert [(f.kind, f.first_step, f.last_step, f.figure) for f in findings] == [
        (e.kind, e.first_step, e.last_step, e.figure) for e in episodes]


@pytest.mark.fit
def test_no_advice_the_model_already_follows(fixed_run):
    summary = fixed_run.model()
    assert summary["has_batch_norm"] and summary["has_residual_add"]
    for finding in fixed_run.diagnose().findings:
        assert "vanishing" != finding.kind
        assert not {"batch_norm", "residual", "he_init", "gating"} & set(_keys(finding)), finding.message
        if finding.layers == ("head",):  # its output sigmoid: confident predictions, not a defect
            assert _keys(finding) in ([], ["output_layer"]), finding.message
    # Whatever the kind, the remedies for this model never repeat what it already has.
    for kind in detect.KINDS:
        keys = [r.key for r in remedies_for(kind, ["dense_0", "relu_0"], summary)]
        assert not {"batch_norm", "residual", "relu_he", "he_init", "gating"} & set(keys), (kind, keys)


# ---------------------------------------------------------------------------
# Synthetic runs: one rule at a time.


def test_simple_rnn_exploding_gets_clipping_and_gating(tmp_path):
    names = ["m/simple_rnn/simple_rnn_cell/kernel", "m/simple_rnn/simple_rnn_cell/recurrent_kernel",
             "m/simple_rnn/simple_rnn_cell/bias", "m/dense/kernel", "m/dense/bias"]
    norms = _healthy_norms(40, 5)
    norms[25, :3] *= 300.0  # a 300x spike in the recurrent layer only: extreme on one record
    model = _summary([_layer("simple_rnn", "SimpleRNN", None, "GlorotUniform", names[:3]),
                      _layer("dense", activation="softmax", init="GlorotUniform", variables=names[3:])])
    diagnosis = write_run(tmp_path, {"grad_norm": (names, norms)}, model).diagnose()
    [finding] = diagnosis.findings
    assert (finding.kind, finding.layers, finding.first_step, finding.last_step) == (
        "exploding", ("simple_rnn",), 25, 25)
    assert finding.rule == "spike" and finding.threshold == 10.0 and 150 < finding.figure < 600
    assert _keys(finding)[:2] == ["clipping", "gating"] and "lower_lr" in _keys(finding)
    assert "batch_norm" not in _keys(finding)  # not the advice for a recurrent layer
    assert "layer simple_rnn (glorot_uniform): gradients explode at step 25." in finding.message
    assert "threshold 10x" in finding.message
    assert finding.first_last_ratio is None


def test_lstm_is_not_told_to_use_gating(tmp_path):
    summary = _summary([_layer("lstm", "LSTM", None, "GlorotUniform")])
    assert "gating" not in [r.key for r in remedies_for("exploding", ["lstm"], summary)]
    assert "gating" not in [r.key for r in remedies_for("vanishing", ["lstm"], summary)]


def test_dead_relu_layer(tmp_path):
    dead = np.full((30, 2), 0.1, np.float32)
    dead[10:, 1] = 0.8
    model = _summary([_layer("dense"), _layer("dense_1")], optimizer="Adam")
    diagnosis = write_run(tmp_path, {"dead_fraction": (["dense", "dense_1"], dead)}, model).diagnose()
    [finding] = diagnosis.findings
    assert (finding.kind, finding.scope, finding.layers) == ("dead", "layer", ("dense_1",))
    assert finding.first_step == 10 and finding.ongoing
    assert finding.figure == pytest.approx(0.8) and finding.threshold == 0.7
    assert _keys(finding) == ["lower_lr", "leaky", "batch_norm"]  # He init is there already
    assert "a lower learning rate for Adam" in finding.message
    assert "from step 10 on" in finding.message
    assert "80% of units passed no gradient for a whole batch (threshold 70%)" in finding.message
    assert "ReLU units are dead: they output 0 for every sample of a batch, so no gradient flows" in finding.message
    # A leaky activation is not told to become leaky; a non-He init is told to use He.
    leaky = _summary([_layer("dense", activation="leaky_relu", init="GlorotUniform")])
    assert [r.key for r in remedies_for("dead", ["dense"], leaky)] == ["lower_lr", "he_init", "batch_norm"]


def test_saturated_sigmoid_layer(tmp_path):
    saturation = np.zeros((20, 1), np.float32)
    saturation[5:12] = 0.9
    model = _summary([_layer("dense", activation="sigmoid", init="GlorotUniform"),
                      _layer("head", activation="sigmoid", init="GlorotUniform")])
    [finding] = write_run(tmp_path, {"saturation_fraction": (["dense"], saturation)}, model).diagnose().findings
    assert (finding.kind, finding.first_step, finding.last_step, finding.ongoing) == ("saturated", 5, 11, False)
    assert _keys(finding) == ["relu_he", "batch_norm", "scale_inputs"]
    assert "at steps 5-11" in finding.message
    # The output layer saturating is what a confident classifier does: no architecture advice.
    assert [r.key for r in remedies_for("saturated", ["head"], model)] == ["output_layer"]


def test_nonfinite_and_stalled(tmp_path):
    names = [f"m/dense_{i}/kernel" for i in range(6)]
    norms = _healthy_norms(20, 6)
    count = np.zeros((20, 6), np.float32)
    count[15:, 3] = 7
    updates = np.full((20, 6), 1e-3, np.float32)
    updates[:, 0] = 1e-6  # the lowest layer's update is 1e-3 of the upper layers'
    model = _summary([_layer(f"dense_{i}", variables=[names[i]]) for i in range(6)])
    run = write_run(tmp_path, {"grad_norm": (names, norms), "grad_nonfinite": (names, count),
                               "update_ratio": (names, updates)}, model)
    findings = {f.kind: f for f in run.diagnose().findings}
    assert set(findings) == {"nonfinite", "stalled"}
    assert findings["nonfinite"].layers == ("dense_3",) and findings["nonfinite"].figure == 7
    assert _keys(findings["nonfinite"]) == ["clipping", "lower_lr", "check_data"]
    stalled = findings["stalled"]
    assert stalled.layers == ("dense_0",) and stalled.rule == "stalled" and stalled.threshold == 1e-2
    assert "adaptive_optimizer" in _keys(stalled)  # the model trains with SGD
    assert "weights barely change" in stalled.message


def test_without_model_summary_the_remedies_are_generic(tmp_path):
    names = [f"net/dense_{i}/kernel" for i in range(4)]
    norms = _healthy_norms(10, 4)
    norms[:, :2] *= 1e-6
    diagnosis = write_run(tmp_path, {"grad_norm": (names, norms)}).diagnose()
    [finding] = diagnosis.findings
    assert finding.layers == ("net/dense_0", "net/dense_1")  # the layer is the path's parent
    assert {"relu_he", "batch_norm", "residual", "gating"} <= set(_keys(finding))
    assert "no model summary" in str(diagnosis)


def test_healthy_run_says_so(tmp_path):
    names = [f"m/dense_{i}/kernel" for i in range(4)]
    diagnosis = write_run(tmp_path, {"grad_norm": (names, _healthy_norms(10, 4))},
                          _summary([_layer(f"dense_{i}", variables=[names[i]]) for i in range(4)])).diagnose()
    assert diagnosis.healthy and diagnosis.kinds == set()
    assert (diagnosis.first_step, diagnosis.last_step) == (0, 9)
    assert "No findings" in str(diagnosis)
    assert diagnosis.first_last_ratio == pytest.approx(1.0, rel=0.5)


def test_thresholds_are_passed_to_detect(tmp_path):
    names = ["m/a/kernel", "m/b/kernel"]
    norms = np.tile(np.float32([1e-5, 1.0]), (10, 1))
    run = write_run(tmp_path, {"grad_norm": (names, norms)})
    assert run.diagnose().kinds == {"vanishing"}
    diagnosis = run.diagnose(thresholds=detect.Thresholds(vanishing_ratio=1e-6))
    assert diagnosis.healthy and diagnosis.thresholds.vanishing_ratio == 1e-6
    assert diagnose(run).kinds == {"vanishing"}


def test_layer_ranges_in_words(tmp_path):
    names = [f"m/dense_{i}/kernel" for i in range(8)]
    norms = np.ones((10, 8), np.float32)
    norms[:, [0, 2, 4]] = 1e-6  # not contiguous: listed, not a range
    model = _summary([_layer(f"dense_{i}", variables=[names[i]]) for i in range(8)])
    [finding] = write_run(tmp_path, {"grad_norm": (names, norms)}, model).diagnose().findings
    assert finding.message.startswith("Vanishing gradients - layers dense_0, dense_2, dense_4 (relu, he_normal)")


def test_repeated_episodes_state_their_remedies_once(tmp_path):
    names = ["m/a/kernel", "m/b/kernel"]
    norms = _healthy_norms(60, 2)
    norms[20:22] *= 50.0  # two records each: persistent
    norms[45:47] *= 50.0
    diagnosis = write_run(tmp_path, {"grad_norm": (names, norms)},
                          _summary([_layer("a", variables=[names[0]]), _layer("b", variables=[names[1]])])).diagnose()
    assert [f.first_step for f in diagnosis.findings] == [20, 45]
    text = diagnosis.text()
    assert text.count("Remedies for this model") == 1 and text.count("Remedies: as above.") == 1
    assert "... and 1 more findings" in diagnosis.text(max_findings=1)


# ---------------------------------------------------------------------------
# Clipping: advice by how the run's keras_vg.AutoClip fared (its records: tests/test_report_clipping.py).


def test_clipping_remedies_by_how_autoclip_fared():
    summary = _summary([_layer("dense")])

    def keys(clipping):
        return [r.key for r in remedies_for("exploding", ["dense"], summary, clipping=clipping)]

    [clip] = [r for r in remedies_for("exploding", ["dense"], summary) if r.key == "clipping"]
    assert "keras_vg.AutoClip()" in clip.text
    assert keys("armed")[0] == "clip_earlier" and "clipping" not in keys("armed")
    assert keys("loose")[0] == "tighter_clipping"
    assert not {"clipping", "clip_earlier", "tighter_clipping"} & set(keys("bounded"))
    assert keys("bounded") == keys(None)[1:]  # the same remedies for the model, clipping aside
    with pytest.raises(ValueError, match="`clipping` must be None, 'armed', 'loose' or 'bounded'"):
        remedies_for("exploding", ["dense"], summary, clipping=True)


def _clipped_run(path, update_at_spike, spike=30):
    """A 300x spike at `spike`; AutoClip on at 30 (clipping 30-31), off at 34; `update_at_spike` applied."""
    names = ["m/a/kernel", "m/b/kernel"]
    norms = _healthy_norms(40, 2)
    norms[spike] *= 300.0  # extreme on one record
    updates = np.full((40, 2), 1e-3, np.float32)
    updates[spike] = update_at_spike
    clipped = np.zeros(40, np.float32)
    clipped[30:32] = 1.0
    events = [{"step": 30, "kind": "clip_on", "message": "on", "global_grad_norm": 141.0, "clip_threshold": 3.5},
              {"step": 34, "kind": "clip_off", "message": "off", "global_grad_norm": 1.2, "clip_threshold": 3.1}]
    stats = {"grad_norm": (names, norms), "update_ratio": (names, updates),
             "clipped": clipped, "skipped": np.zeros(40, np.float32)}
    model = _summary([_layer("a", variables=[names[0]]), _layer("b", variables=[names[1]])])
    return write_run(path, stats, model, events).diagnose()


def test_a_run_whose_clipping_kept_the_updates_bounded_is_not_told_to_clip(tmp_path):
    diagnosis = _clipped_run(tmp_path, update_at_spike=0.01)
    clip = diagnosis.clipping
    assert (clip.switched_on, clip.switched_off, clip.clipped, clip.clipped_range) == ((30,), (34,), 2, (30, 31))
    assert not clip.on_at_end and clip.on_at(30) and clip.on_at(34) and not clip.on_at(29) and not clip.on_at(35)
    [finding] = diagnosis.findings
    assert (finding.kind, finding.first_step, finding.clipped, finding.skipped) == ("exploding", 30, 1, 0)
    assert not {"clipping", "clip_earlier", "tighter_clipping"} & set(_keys(finding))
    assert ("AutoClip was on throughout the 1 recorded step of this episode; it clipped 1 step, and 0 steps were "
            "skipped by AutoClip (not applied); the weight updates stayed bounded (update ratio at most 0.01).") \
        in finding.message
    assert ("Clipping (keras_vg.AutoClip): on at step 30 (global norm 1.4e+02, threshold 3.5), off at step 34; "
            "clipped 2 steps, at steps 30-31; off (armed) from step 34 on.") in str(diagnosis)


def test_a_run_whose_updates_exploded_with_clipping_on_is_told_to_clip_tighter(tmp_path):
    [finding] = _clipped_run(tmp_path, update_at_spike=5.0).findings
    assert _keys(finding)[0] == "tighter_clipping"
    assert "the weight updates still exploded (update ratio up to 5 at step 30, threshold 1)" in finding.message


def test_an_explosion_before_clipping_switched_on_is_told_to_clip_from_the_first_step(tmp_path):
    diagnosis = _clipped_run(tmp_path, update_at_spike=1e-3, spike=10)
    [finding] = diagnosis.findings
    assert (finding.first_step, finding.clipped) == (10, 0)
    assert _keys(finding)[0] == "clip_earlier" and "trigger=None" in finding.remedies[0].text
    assert "AutoClip was armed but not on during these steps." in finding.message


def test_a_run_without_autoclip_has_no_clipping(tmp_path):
    names = ["m/a/kernel"]
    diagnosis = write_run(tmp_path, {"grad_norm": (names, _healthy_norms(10, 1))}).diagnose()
    assert diagnosis.clipping is None and "Clipping" not in str(diagnosis)


def test_first_last_ratio_uses_the_first_and_last_kernels():
    names = ["m/a/kernel", "m/a/bias", "m/b/kernel", "m/b/bias"]
    values = np.tile(np.float32([1e-4, 5.0, 1.0, 7.0]), (6, 1))
    values[0, 0] = 1.0  # outside the steps asked for
    steps = np.arange(6)
    assert first_last_ratio((steps, names, values), first_step=1) == pytest.approx(1e-4)
    assert first_last_ratio(None) is None
    assert first_last_ratio((steps, ["m/a/kernel"], values[:, :1])) is None


# ---------------------------------------------------------------------------
# Non-finite steps between records (the monitor's `nonfinite` events, format 1.2)


def _run_with_events(path, count_at=(), events=()):
    """`grad_norm` and `grad_nonfinite` recorded every 10 steps (0..90), events written as the monitor does."""
    names = ["m/dense/kernel", "m/dense_1/kernel"]
    writer = EventWriter(path)
    writer.write_json(fmt.MODEL_NAME, 0, _summary([_layer("dense", variables=names[:1]),
                                                   _layer("dense_1", variables=names[1:])]))
    for step in range(0, 100, 10):
        count = [3.0, 0.0] if step in count_at else [0.0, 0.0]
        writer.write_record(step, {"grad_norm": ([1.0, 1.0], names), "grad_nonfinite": (count, names)})
    for event in events:
        writer.write_json(fmt.EVENTS_NAME, event["step"], [event])
    writer.close()
    return read_run(path)


def _nonfinite_event(first, last, source="loss"):
    return {"kind": "nonfinite", "step": first, "last_step": last, "source": source,
            "message": f"non-finite {source} at steps {first}-{last}"}


def test_nonfinite_steps_between_records_are_a_finding(tmp_path):
    run = _run_with_events(tmp_path / "between", events=[_nonfinite_event(21, 27)])
    [finding] = run.diagnose().findings
    assert (finding.kind, finding.scope, finding.first_step, finding.last_step) == ("nonfinite", "global", 21, 27)
    assert finding.rule == "nonfinite_event" and finding.episode.names == ("loss",)
    assert finding.message.startswith("Non-finite values between records, steps 21-27: the loss was not finite")
    assert _keys(finding) == ["clipping", "lower_lr", "check_data"]
    assert not run.diagnose().healthy


def test_a_recorded_episode_covers_the_events_next_to_it(tmp_path):
    # Non-finite at the records of steps 30 and 40; the stretch 31-39 between them is the same episode,
    # and so is 21-29, which runs into the record at step 30. Steps 61-65 are apart: a finding of their own.
    events = [_nonfinite_event(21, 29), _nonfinite_event(31, 39), _nonfinite_event(61, 65, "weights")]
    findings = _run_with_events(tmp_path / "covered", count_at=(30, 40), events=events).diagnose().findings
    assert [(f.kind, f.scope, f.first_step, f.last_step) for f in findings] == [
        ("nonfinite", "variable", 30, 40), ("nonfinite", "global", 61, 65)]
    assert "the weights was not finite" not in findings[1].message and "the weights were not finite" \
        in findings[1].message


# ---------------------------------------------------------------------------
# Notes: gradients that are zero by construction


def test_a_bias_before_batch_norm_is_a_note_not_a_finding(tmp_path):
    names = ["m/dense/kernel", "m/dense/bias", "m/bn/gamma", "m/bn/beta", "m/out/kernel", "m/out/bias"]
    model = _summary([_layer("dense", variables=names[:2]), _layer("bn", "BatchNormalization", None, None, names[2:4]),
                      _layer("out", activation="softmax", variables=names[4:])], has_batch_norm=True)
    model["structural_zeros"] = [{"variable": "m/dense/bias", "layer": "dense", "reason": "batch_norm_follows",
                                  "by": "bn"}]
    norms = _healthy_norms(20, 6)
    norms[:, 1] = 3e-8
    diagnosis = write_run(tmp_path, {"grad_norm": (names, norms)}, model).diagnose()
    assert diagnosis.healthy and not diagnosis.findings
    [note] = diagnosis.notes
    assert (note.kind, note.reason, note.variables, note.layers) == (
        "zero_gradient", "batch_norm_follows", ("m/dense/bias",), ("dense",))
    assert note.ratio == pytest.approx(float(np.max(norms[:, 1] / norms[:, 0])), rel=1e-5)
    text = str(diagnosis)
    assert "No findings" in text and "Notes (information, not problems):" in text
    assert "use_bias=False on dense saves the parameters" in text


@pytest.mark.parametrize("activation, words", [
    ("relu", "ReLU units are dead: they output 0 for every sample of a batch"),
    ("relu6", "ReLU6 units pass no gradient: they sit at 0 or 6 for every sample"),
    ("elu", "ELU units pass almost no gradient: they sit deep on their saturated negative side"),
    ("selu", "SELU units pass almost no gradient"),
    ("gelu", "units pass no gradient for a whole batch"),
])
def test_dead_units_are_worded_for_their_activation(tmp_path, activation, words):
    dead = np.full((10, 1), 0.9, np.float32)
    model = _summary([_layer("dense", activation=activation)])
    [finding] = write_run(tmp_path, {"dead_fraction": (["dense"], dead)}, model).diagnose().findings
    assert words in finding.message and "ReLU units are dead" not in finding.message.replace(words, "")


def test_leaky_units_are_never_reported_dead(tmp_path):
    dead = np.full((10, 2), 0.9, np.float32)  # old-style records counted leaky units at <= 0 as dead
    model = _summary([_layer("a", activation="leaky_relu"), _layer("b", activation="prelu")])
    assert write_run(tmp_path, {"dead_fraction": (["a", "b"], dead)}, model).diagnose().healthy


def test_an_optimizer_that_clips_already_is_told_to_clip_tighter_not_to_start():
    summary = dict(_summary([_layer("rnn", "SimpleRNN", None, "GlorotUniform")]), recurrent=["SimpleRNN"],
                   optimizer_clipping={"global_clipnorm": 1.0})
    remedies = remedies_for("exploding", ["rnn"], summary)
    assert [r.key for r in remedies][:2] == ["tighter_clipping", "gating"]
    assert "the optimizer's global_clipnorm=1 (the gradients here are before it)" in remedies[0].text
    # With AutoClip in the run, how it fared decides, as before.
    assert remedies_for("exploding", ["rnn"], summary, clipping="armed")[0].key == "clip_earlier"
