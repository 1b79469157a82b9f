"""The matplotlib heatmap (keras_vg.plot, Run.plot, `keras-vg plot`): checked on the pixels it writes."""

import subprocess
import sys

import numpy as np
import pytest

from keras_vg import format as fmt
from keras_vg.cli import main
from keras_vg.event_writer import EventWriter
from keras_vg.plot import plot_run
from keras_vg.reader import read_run

LAYERS = [f"dense_{i}" for i in range(6)]
NAMES = [f"m/{layer}/{part}" for layer in LAYERS for part in ("kernel", "bias")]
VANISHING_ROWS = range(4)  # dense_0 and dense_1, kernel and bias
NONFINITE_ROW, NONFINITE_STEPS = 10, range(40, 45)
DEAD_STEPS = range(30, 60)  # every layer: dead_fraction 0.9
T = 60


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.RandomState(0)
    norms = rng.lognormal(0.0, 0.2, (T, len(NAMES))).astype(np.float32)
    norms[:, list(VANISHING_ROWS)] *= 1e-7
    counts = np.zeros_like(norms)
    norms[list(NONFINITE_STEPS), NONFINITE_ROW] = np.nan
    counts[list(NONFINITE_STEPS), NONFINITE_ROW] = 3
    writer = EventWriter(tmp_path / "run")
    writer.write_json(fmt.MODEL_NAME, 0, {"name": "m", "layers": [
        {"name": layer, "variables": [n for n in NAMES if n.split("/")[1] == layer]} for layer in LAYERS]})
    for step in range(T):
        writer.write_record(step, {"grad_norm": (norms[step], NAMES), "grad_nonfinite": (counts[step], NAMES),
                                   "dead_fraction": (np.full(6, 0.1 if step < 30 else 0.9), LAYERS)})
    writer.close()
    return tmp_path / "run"


def _row_strips(image, ax, rows):
    """The pixels of each heatmap row, inset from the cell borders: a list of `[h, w, 3]` arrays."""
    height = image.shape[0]
    box = ax.get_window_extent()  # display pixels, origin at the bottom left
    cell = box.height / rows
    strips = []
    for row in range(rows):
        top = height - (box.y1 - row * cell)
        strips.append(image[int(top + 0.25 * cell):int(top + 0.75 * cell),
                            int(box.x0) + 3:int(box.x1) - 3, :3])
    return strips


def _white(strip):
    return float(np.mean(np.all(strip > 0.9, axis=-1)))


def _magenta(strip):
    return float(np.mean((strip[..., 0] > 0.9) & (strip[..., 1] < 0.1) & (strip[..., 2] > 0.9)))


def _hatched(strip):
    """How much of a cell strip differs from its own median colour: hatching, or none (a plain cell)."""
    median = np.median(strip.reshape(-1, 3), axis=0)
    return float(np.mean(np.abs(strip - median).max(axis=-1) > 0.15))


def test_cli_png_shows_the_vanishing_band(run_dir, tmp_path, capsys):
    import matplotlib.image

    path = tmp_path / "heatmap.png"
    assert main(["plot", str(run_dir), "-o", str(path), "--by", "variable"]) == 0
    image = matplotlib.image.imread(path)
    # The same drawing in-process gives the axes' place in the picture.
    figure = plot_run(read_run(run_dir), path=tmp_path / "same.png", by="variable")
    assert matplotlib.image.imread(tmp_path / "same.png").shape == image.shape
    strips = _row_strips(image, figure.axes[0], len(NAMES))

    brightness = [float(np.median(s.mean(axis=-1))) for s in strips]
    white = [_white(s) for s in strips]
    for row in VANISHING_ROWS:  # dark (log10 norm ~ -7) and hatched in white
        assert brightness[row] < 0.35, (row, brightness)
        assert white[row] > 0.05, (row, white)
    for row in range(4, len(NAMES)):  # bright (norm ~ 1) and not hatched
        assert brightness[row] > 0.5, (row, brightness)
        assert white[row] < 0.01, (row, white)
    # Non-finite cells are magenta, in their row only, over about 5 of the 60 columns.
    assert 0.03 < _magenta(strips[NONFINITE_ROW]) < 0.15
    assert max(_magenta(s) for i, s in enumerate(strips) if i != NONFINITE_ROW) == 0.0


def test_layer_rows_by_default(run_dir, tmp_path):
    import matplotlib.image

    path = tmp_path / "layers.png"
    assert main(["plot", str(run_dir), "-o", str(path)]) == 0
    image = matplotlib.image.imread(path)
    run = read_run(run_dir)
    figure = run.plot(path=tmp_path / "same.png")  # Run.plot draws layers too
    ax = figure.axes[0]
    assert matplotlib.image.imread(tmp_path / "same.png").shape == image.shape
    _, layers, values = run.stat("grad_norm", by="layer")
    assert layers == LAYERS and ax.get_ylabel() == "layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    strips = _row_strips(image, ax, len(LAYERS))
    # The colour follows the layer's combined norm: ~1e-7 for the two vanishing layers, ~1 for the others.
    assert np.nanmax(values[:, :2]) < 1e-5 < np.nanmin(values[:, 2:])
    brightness = [float(np.median(s.mean(axis=-1))) for s in strips]
    assert max(brightness[:2]) < 0.35 < 0.5 < min(brightness[2:]), brightness
    assert [_white(s) > 0.05 for s in strips] == [True, True, False, False, False, False]
    # dense_5's kernel was NaN at 5 steps: its bias keeps the layer's norm finite, but the
    # layer is marked non-finite there, in magenta, and no other layer is.
    assert np.isfinite(values[list(NONFINITE_STEPS), 5]).all()
    assert 0.03 < _magenta(strips[5]) < 0.15
    assert max(_magenta(s) for s in strips[:5]) == 0.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["nonfinite", "vanishing"]


def test_dead_regions_are_marked(run_dir, tmp_path):
    import matplotlib.image

    figure = read_run(run_dir).plot("dead_fraction", path=tmp_path / "dead.png")
    image = matplotlib.image.imread(tmp_path / "dead.png")
    ax = figure.axes[0]
    for strip in _row_strips(image, ax, len(LAYERS)):
        half = strip.shape[1] // 2  # steps 0-29 alive, 30-59 dead
        assert _hatched(strip[:, 4:half - 4]) < 0.01
        assert _hatched(strip[:, half + 4:-4]) > 0.1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dead"]


def test_layer_statistic_and_a_given_axes(run_dir):
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert read_run(run_dir).plot("dead_fraction", ax=ax) is figure
    assert ax.get_ylabel() == "layer" and len(ax.get_yticklabels()) == len(LAYERS)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dead"]
    with pytest.raises(ValueError, match="Received: stat='global_grad_norm'"):
        read_run(run_dir).plot("global_grad_norm")
    with pytest.raises(KeyError, match="update_ratio"):
        read_run(run_dir).plot("update_ratio")
    with pytest.raises(ValueError, match="Received: by='layers'"):
        plot_run(read_run(run_dir), by="layers")


def test_matplotlib_is_imported_only_to_plot():
    probe = ("import sys, keras_vg, keras_vg.reader, keras_vg.diagnosis, keras_vg.plot, keras_vg.cli; "
             "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert fmt.axis_of("dead_fraction") == fmt.AXIS_LAYER


def test_cli_rows_option(tmp_path, capsys):
    writer = EventWriter(tmp_path / "ratios")
    for step in range(3):
        writer.write_stat("update_ratio", step, np.full(len(NAMES), 1e-3), NAMES)
    writer.close()
    out = str(tmp_path / "x.png")
    assert main(["plot", str(tmp_path / "ratios"), "-o", out, "--stat", "update_ratio"]) == 1
    assert "through weight_norm" in capsys.readouterr().err  # a layer's ratio needs its variables' norms
    assert main(["plot", str(tmp_path / "ratios"), "-o", out, "--stat", "update_ratio", "--by", "variable"]) == 0
    assert main(["plot", str(tmp_path / "ratios"), "-o", out, "--by", "layers"]) == 2
    assert "invalid choice: 'layers'" in capsys.readouterr().err
