"""Smoke runs of examples/ with a reduced epoch count; what each prints is checked against
what it is meant to show.

The quickstart runs as its own process, as a user runs it. The others call the
script's `main(argv)` in this process: the same code path after the imports,
without paying for a TensorFlow import per example."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import keras_vg

pytestmark = pytest.mark.fit

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """Imports `examples/<name>` as a module."""
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name, tmp_path, capsys, *args):
    """Runs `examples/<name>`'s `main` on `args`; returns `(exit code, stdout)`."""
    if "load_digits" in (EXAMPLES / name).read_text() and importlib.util.find_spec("sklearn") is None:
        pytest.fail("examples/ need scikit-learn (load_digits): pip install scikit-learn")
    module = load_example(name)
    capsys.readouterr()
    code = module.main(["--log-dir", str(tmp_path / "logs"), *args])
    return code or 0, capsys.readouterr().out


def table_row(out, first_cell):
    """The table line starting with `first_cell`, split into cells."""
    [line] = [line for line in out.splitlines() if line.split()[:1] == [first_cell]]
    return line.split()


def test_quickstart(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--log-dir", str(tmp_path / "logs"), "--epochs", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr
    assert "Vanishing gradients - " in result.stdout and "(sigmoid, glorot_uniform)" in result.stdout
    assert "Remedies for this model: ReLU-family activations" in result.stdout


def test_vanishing_mlp(tmp_path, capsys):
    code, out = run_example("vanishing_mlp.py", tmp_path, capsys, "--epochs", "1")
    assert code == 0
    sigmoid = table_row(out, "sigmoid")
    assert "vanishing" in sigmoid[3:] or "vanishing," in sigmoid[3:], out
    assert float(sigmoid[2]) < 1e-3
    # Each remedy tells the truth: no finding at all, not just no vanishing.
    for variant in ("relu_he", "batchnorm", "residual"):
        row = table_row(out, variant)
        assert row[3:] == ["none"], out
        assert float(row[2]) > 1e-2, out
    # The sigmoid net's report follows the table, with remedies for this model.
    assert "Vanishing gradients - " in out and "(sigmoid, glorot_uniform): gradients vanish from step 0 on" in out
    assert "BatchNormalization after each Dense" in out
    assert (tmp_path / "logs" / "relu_he").is_dir()


def test_dying_relu(tmp_path, capsys):
    code, out = run_example("dying_relu.py", tmp_path, capsys, "--epochs", "1")
    assert code == 0
    assert table_row(out, "0.001")[-1] == "none", out
    bad = table_row(out, "0.05")
    assert bad[-1] == "dead", out
    assert min(int(cell.rstrip("%")) for cell in bad[2:6]) >= 50  # every ReLU layer lost half its units
    assert "Dead units - " in out and "(relu, he_normal): ReLU units are dead: they output 0 for every sample" in out
    assert "a lower learning rate for Adam" in out and "LeakyReLU or ELU" in out


def test_exploding_rnn_diverges_without_clipping_and_learns_with_autoclip(tmp_path, capsys):
    code, out = run_example("exploding_rnn.py", tmp_path, capsys, "--epochs", "1", "--variants", "none", "autoclip")
    assert code == 0, out
    # The reference: the validation loss of predicting 0, computed here from the validation targets.
    _, y_val = load_example("exploding_rnn.py").make_data((0, 8), seed=1)
    zero_loss = float(np.mean(y_val ** 2))
    none, autoclip = table_row(out, "none"), table_row(out, "autoclip")
    none_loss = float(none[1])
    assert not np.isfinite(none_loss) or none_loss > 1e3, out
    assert {"exploding", "nonfinite"} <= {kind.rstrip(",") for kind in none[6:]}, out
    assert float(autoclip[1]) < 0.2 * zero_loss, out

    # Without clipping, the report suggests it (and gating for the SimpleRNN).
    none_report, autoclip_report = out.split("keras-vg report for ")[1:]
    assert "Exploding gradients - " in none_report and "simple_rnn" in none_report
    assert "add keras_vg.AutoClip() to callbacks" in none_report
    assert "gated recurrent layers (LSTM or GRU) instead of SimpleRNN" in none_report
    assert "Clipping" not in none_report

    # With AutoClip, the table and the report state what its records say, and do not suggest it again.
    run = keras_vg.read_run(tmp_path / "logs" / "autoclip")
    [on] = [e for e in run.events() if e["kind"] == "clip_on"]
    clipped, skipped = (int(np.sum(run.stat(name)[2])) for name in ("clipped", "skipped"))
    assert clipped > 0
    assert autoclip[3:6] == [str(on["step"]), str(clipped), str(skipped)], out
    assert (f"Clipping (keras_vg.AutoClip): on at step {on['step']} (global norm {on['global_grad_norm']:.2g}, "
            f"threshold {on['clip_threshold']:.2g}); clipped {clipped} step") in autoclip_report
    exploding = autoclip_report.split("Exploding gradients - ", 1)[1]
    assert "\n  Clipping: AutoClip was on " in exploding, autoclip_report
    assert "add keras_vg.AutoClip()" not in autoclip_report
    assert "gated recurrent layers (LSTM or GRU) instead of SimpleRNN" in exploding


def test_vanishing_mlp_variants_differ_only_in_the_fix():
    from keras_vg.model_summary import summarize_model

    module = load_example("vanishing_mlp.py")
    summaries = {variant: summarize_model(module.build(variant)) for variant in module.VARIANTS}
    dense = {v: [e for e in s["layers"] if e["class"] == "Dense"] for v, s in summaries.items()}
    assert [len(dense[v]) for v in module.VARIANTS] == [11, 11, 11, 12]  # residual: + a projection
    assert {e["activation"] for e in dense["relu_he"][:-1]} == {"relu"}
    assert {e["kernel_initializer"] for e in dense["relu_he"][:-1]} == {"HeNormal"}
    assert summaries["batchnorm"]["has_batch_norm"] and not summaries["sigmoid"]["has_batch_norm"]
    assert summaries["residual"]["has_residual_add"] and not summaries["sigmoid"]["has_residual_add"]
