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

import pytest

import keras_vg

pytestmark = pytest.mark.fit

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, tmp_path, capsys, *args):
    """Runs `examples/<name>`'s `main` on `args`; returns `(exit code, stdout)`."""
    if importlib.util.find_spec("sklearn") is None:
        pytest.fail("examples/ need scikit-learn (load_digits): pip install scikit-learn")
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
    # The pair that makes the point; the other variants' models are checked below without training
    # (tracing a 30-layer model dominates a smoke run's time).
    code, out = run_example("vanishing_mlp.py", tmp_path, capsys, "--epochs", "1", "--variants", "sigmoid", "relu_he")
    assert code == 0
    sigmoid = table_row(out, "sigmoid")
    assert "vanishing" in sigmoid[3:] or "vanishing," in sigmoid[3:], out
    assert float(sigmoid[2]) < 1e-3
    relu_he = table_row(out, "relu_he")
    assert not any(cell.startswith("vanishing") for cell in relu_he[3:]), out
    assert float(relu_he[2]) > 1e-2, out
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
    assert "Dead units - " in out and "(relu, he_normal): ReLU units are dead" in out
    assert "a lower learning rate for Adam" in out and "LeakyReLU or ELU" in out


def test_exploding_rnn_without_clipping(tmp_path, capsys):
    code, out = run_example("exploding_rnn.py", tmp_path, capsys, "--epochs", "1", "--variants", "none")
    assert code == 0
    assert table_row(out, "none")[-1] == "exploding", out
    assert "Exploding gradients - layer" in out and "simple_rnn" in out
    assert "gated recurrent layers (LSTM or GRU) instead of SimpleRNN" in out
    assert "gradient clipping" in out


@pytest.mark.xfail("AutoClip" not in keras_vg.__all__, run=False, strict=False,
                   reason="keras_vg.AutoClip (another issue) does not exist yet")
def test_exploding_rnn_with_autoclip(tmp_path, capsys):
    code, out = run_example("exploding_rnn.py", tmp_path, capsys, "--epochs", "1", "--variants", "autoclip")
    assert code == 0, out
    assert "nonfinite" not in " ".join(table_row(out, "autoclip")[4:]), out


def test_vanishing_mlp_variants_differ_only_in_the_fix():
    from keras_vg.model_summary import summarize_model

    spec = importlib.util.spec_from_file_location("vanishing_mlp", EXAMPLES / "vanishing_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summaries = {variant: summarize_model(module.build(variant)) for variant in module.VARIANTS}
    dense = {v: [e for e in s["layers"] if e["class"] == "Dense"] for v, s in summaries.items()}
    assert [len(dense[v]) for v in module.VARIANTS] == [11, 11, 11, 12]  # residual: + a projection
    assert {e["activation"] for e in dense["relu_he"][:-1]} == {"relu"}
    assert {e["kernel_initializer"] for e in dense["relu_he"][:-1]} == {"HeNormal"}
    assert summaries["batchnorm"]["has_batch_norm"] and not summaries["sigmoid"]["has_batch_norm"]
    assert summaries["residual"]["has_residual_add"] and not summaries["sigmoid"]["has_residual_add"]
