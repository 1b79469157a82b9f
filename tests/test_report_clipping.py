"""The diagnosis of a run trained with GradientMonitor and keras_vg.AutoClip: its clipping facts match the records.

The model is built here (not taken from examples/): a small ReLU regressor
whose batch `SPIKE` is scaled by 1e3 (an explosion after ZClip's warm-up) and
whose batch `NAN` holds a NaN (a non-finite step, skipped). With `cooldown`,
clipping switches off between the two. Every expected fact is read from the
run's own records and events, or from the batches the test corrupted.
"""

import numpy as np
import pytest

import keras_vg
from keras_vg.cli import main as cli

pytestmark = pytest.mark.fit

BATCH, BATCHES, SPIKE, NAN, COOLDOWN = 16, 60, 30, 45, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    x = rng.randn(BATCH * BATCHES, 4).astype("float32")
    y = (x @ rng.randn(4, 1)).astype("float32")
    x[SPIKE * BATCH: (SPIKE + 1) * BATCH] *= 1e3
    y[SPIKE * BATCH: (SPIKE + 1) * BATCH] *= 1e3
    x[NAN * BATCH + 3, 0] = np.nan
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    log_dir = tmp_path_factory.mktemp("clipping") / "run"
    clip = keras_vg.AutoClip(cooldown=COOLDOWN, verbose=0)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0), clip])
    keras.backend.clear_session()
    return keras_vg.read_run(log_dir)


def _report(run, capsys):
    capsys.readouterr()
    assert cli(["report", run.log_dir]) == 0
    return capsys.readouterr().out


def test_the_report_states_the_clipping_the_records_show(run, capsys):
    events = [e for e in run.events() if e["kind"] in ("clip_on", "clip_off", "skip")]
    steps, _, clipped = run.stat("clipped")
    _, _, skipped = run.stat("skipped")
    on = [e for e in events if e["kind"] == "clip_on"]
    off = [e for e in events if e["kind"] == "clip_off"]
    skips = [e["step"] for e in events if e["kind"] == "skip"]
    # The run went as constructed: on at the spike, off after the cooldown, on again at the NaN, skipped.
    assert [e["step"] for e in on] == [SPIKE, NAN] and skips == [NAN]
    assert SPIKE + COOLDOWN <= off[0]["step"] < NAN

    clipping = run.diagnose().clipping
    assert clipping.switched_on == tuple(e["step"] for e in on)
    assert clipping.switched_off == tuple(e["step"] for e in off)
    assert clipping.clipped == int(clipped.sum()) > 0 and clipping.skipped == int(skipped.sum()) == 1
    clipped_steps = steps[clipped > 0]
    assert clipping.clipped_range == (clipped_steps[0], clipped_steps[-1])
    assert clipping.skipped_steps == (NAN,)
    assert clipping.on_at_end == (events[-1]["kind"] != "clip_off")

    text = _report(run, capsys)
    first = on[0]
    assert (f"Clipping (keras_vg.AutoClip): on at step {SPIKE} (global norm {first['global_grad_norm']:.2g}, "
            f"threshold {first['clip_threshold']:.2g}), off at step {off[0]['step']}, on at step {NAN} "
            "(non-finite gradient)") in text
    range_ = (f"step {clipped_steps[0]}" if len(set(clipped_steps)) == 1
              else f"steps {clipped_steps[0]}-{clipped_steps[-1]}")
    count = int(clipped.sum())
    assert (f"; clipped {count} step{'' if count == 1 else 's'}, at {range_}; 1 step skipped by AutoClip "
            f"(non-finite gradients, not applied), at step {NAN};") in text
    assert "stalled" not in text.lower()  # issue 13: a skipped step is not a stall


def test_findings_during_clipping_say_how_it_went_instead_of_suggesting_it(run, capsys):
    diagnosis = run.diagnose()
    steps, _, clipped = run.stat("clipped")
    exploding = [f for f in diagnosis.findings if f.kind == "exploding" and f.first_step <= SPIKE <= f.last_step]
    nonfinite = [f for f in diagnosis.findings if f.kind == "nonfinite"]
    assert exploding and nonfinite, str(diagnosis)
    for finding in exploding + nonfinite:
        during = (steps >= finding.first_step) & (steps <= finding.last_step)
        assert finding.clipped == int(clipped[during].sum())
        assert not {"clipping", "clip_earlier"} & {r.key for r in finding.remedies}, finding.message
        assert "\n  Clipping: AutoClip was on " in finding.message
    assert exploding[0].clipped >= 1  # the spike itself was clipped
    assert nonfinite[0].skipped == 1 and "and 1 step was skipped by AutoClip (not applied)" in nonfinite[0].message
    # The skipped step is a finding of its own, with its count and step.
    [skipped] = [f for f in diagnosis.findings if f.kind == "skipped"]
    assert (skipped.first_step, skipped.last_step, skipped.figure, skipped.remedies) == (NAN, NAN, 1.0, ())
    assert f"Steps skipped by AutoClip - training: 1 step with a non-finite gradient was skipped by AutoClip " \
           f"at step {NAN}." in skipped.message
    assert "add keras_vg.AutoClip()" not in _report(run, capsys)
