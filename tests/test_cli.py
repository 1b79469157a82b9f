"""The `keras-vg` command: exit codes and messages that say what to do, no tracebacks."""

import os
import subprocess
import sys

from keras_vg import format as fmt
from keras_vg.cli import main
from keras_vg.event_writer import EventWriter

NAMES = ["m/dense/kernel", "m/dense/bias", "m/dense_1/kernel", "m/dense_1/bias"]
MODEL = {"name": "m", "optimizer": "SGD", "has_batch_norm": False, "has_residual_add": False, "recurrent": [],
         "layers": [{"name": n, "class": "Dense", "activation": "sigmoid", "kernel_initializer": "GlorotUniform",
                     "variables": [f"m/{n}/kernel", f"m/{n}/bias"]} for n in ("dense", "dense_1")]}


def write_vanishing_run(path, steps=12):
    writer = EventWriter(path)
    writer.write_json(fmt.MODEL_NAME, 0, MODEL)
    for step in range(steps):
        writer.write_stat("grad_norm", step, [1e-6, 1e-6, 1.0, 1.0], NAMES)
    writer.close()
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_help(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "report" in out and "plot" in out and "GradientMonitor(log_dir=...)" in out
    code, out, _ = run_cli(capsys, "plot", "--help")
    assert code == 0 and "--output" in out


def test_bad_command_lines_exit_2(capsys):
    assert run_cli(capsys)[0] == 2
    assert run_cli(capsys, "diagnose", "x")[0] == 2
    code, _, err = run_cli(capsys, "plot", "somewhere")  # no -o
    assert code == 2 and "--output" in err
    code, _, err = run_cli(capsys, "plot", "somewhere", "-o", "x.png", "--stat", "global_grad_norm")
    assert code == 2 and "invalid choice" in err


def test_report_prints_the_diagnosis(tmp_path, capsys):
    log_dir = write_vanishing_run(tmp_path / "run1")
    code, out, err = run_cli(capsys, "report", log_dir)
    assert code == 0 and err == ""
    assert f"keras-vg report for {log_dir}" in out
    assert "Vanishing gradients - layer dense (sigmoid, glorot_uniform): gradients vanish from step 0 on" in out
    assert "Remedies for this model:" in out


def test_no_such_directory(tmp_path, capsys):
    code, out, err = run_cli(capsys, "report", str(tmp_path / "nope"))
    assert code == 1 and out == ""
    assert err.startswith("keras-vg: error: no such directory:") and "GradientMonitor(log_dir=...)" in err


def test_a_file_is_not_a_run(tmp_path, capsys):
    log_dir = write_vanishing_run(tmp_path / "run1")
    event_file = os.path.join(log_dir, os.listdir(log_dir)[0])
    code, _, err = run_cli(capsys, "report", event_file)
    assert code == 1 and f"give the run directory that holds it: {log_dir}" in err


def test_no_data_lists_the_runs_below(tmp_path, capsys):
    write_vanishing_run(tmp_path / "logs" / "run1")
    write_vanishing_run(tmp_path / "logs" / "run2")
    logs = str(tmp_path / "logs")
    code, _, err = run_cli(capsys, "report", logs)
    assert code == 1
    assert f"no keras-vg data directly in {logs}" in err
    assert os.path.join(logs, "run1") in err and os.path.join(logs, "run2") in err
    assert f"keras-vg report {os.path.join(logs, 'run1')}" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png"))
    assert code == 1 and "no keras-vg data in" in err and "or below it" in err


def test_newer_format_says_upgrade(tmp_path, capsys, monkeypatch):
    ours = fmt.FORMAT_VERSION
    newer = f"{int(ours.split('.')[0]) + 1}.0"
    monkeypatch.setattr(fmt, "FORMAT_VERSION", newer)
    log_dir = write_vanishing_run(tmp_path / "future")
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "report", log_dir)
    assert code == 1
    assert f"format {newer}, newer than the format {ours}" in err and "pip install -U keras-vg" in err


def test_plot_errors(tmp_path, capsys):
    log_dir = write_vanishing_run(tmp_path / "run1")
    code, _, err = run_cli(capsys, "plot", log_dir, "-o", str(tmp_path / "missing" / "x.png"))
    assert code == 1 and "no such directory" in err and "Create it first" in err
    code, _, err = run_cli(capsys, "plot", log_dir, "-o", str(tmp_path / "x.png"), "--stat", "dead_fraction")
    assert code == 1 and "did not record dead_fraction; it has: grad_norm" in err
    code, _, err = run_cli(capsys, "plot", log_dir, "-o", str(tmp_path / "x.unknown"))
    assert code == 1 and "cannot write" in err
    code, out, _ = run_cli(capsys, "plot", log_dir, "-o", str(tmp_path / "x.png"))
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'x.png'}"
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")


def test_as_a_process_no_traceback_and_no_tensorflow(tmp_path):
    """A real process: exit codes as the shell sees them; the report never loads TensorFlow."""
    log_dir = write_vanishing_run(tmp_path / "run1")
    bad = subprocess.run([sys.executable, "-m", "keras_vg.cli", "report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "no such directory" in bad.stderr
    probe = ("import sys; from keras_vg.cli import main; code = main(['report', sys.argv[1]]); "
             "print('tensorflow loaded:', 'tensorflow' in sys.modules); sys.exit(code)")
    good = subprocess.run([sys.executable, "-c", probe, log_dir], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "Vanishing gradients" in good.stdout and "tensorflow loaded: False" in good.stdout


def test_single_step_run(tmp_path, capsys):
    log_dir = write_vanishing_run(tmp_path / "one", steps=1)
    code, out, _ = run_cli(capsys, "report", log_dir)
    assert code == 0 and "recorded steps 0-0" in out and "first/last gradient-norm ratio 1e-06" in out
    # One record is no episode: the report says why it has no finding.
    assert "No findings" in out and "Only 1 recorded step: findings other than extreme ones" in out
    log_dir = write_vanishing_run(tmp_path / "two", steps=2)
    code, out, _ = run_cli(capsys, "report", log_dir)
    assert code == 0 and "gradients vanish from step 0 on" in out and "Only" not in out
