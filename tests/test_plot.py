"""The matplotlib heatmap (keras_vg.plot, Run.plot, `keras-vg plot`): checked on the pixels it writes."""

import subprocess
import sys

import numpy as np
import pytest

from keras_vg import format as fmt
from keras_vg.cli import main
from keras_vg.event_writer import EventWriter
from keras_vg.reader import read_run

LAYERS = [f"dense_{i}" for i in range(6)]
NAMES = [f"m/{layer}/{part}" for layer in LAYERS for part in ("kernel", "bias")]
VANISHING_ROWS = range(4)  # dense_0 and dense_1, kernel and bias
NONFINITE_ROW, NONFINITE_STEPS = 10, range(40, 45)
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


def test_cli_png_shows_the_vanishing_band(run_dir, tmp_path, capsys):
    import matplotlib.image

    path = tmp_path / "heatmap.png"
    assert main(["plot", str(run_dir), "-o", str(path)]) == 0
    image = matplotlib.image.imread(path)
    # The same drawing in-process gives the axes' place in the picture.
    figure = read_run(run_dir).plot(path=tmp_path / "same.png")
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


def test_matplotlib_is_imported_only_to_plot():
    probe = ("import sys, keras_vg, keras_vg.reader, keras_vg.diagnosis, keras_vg.plot, keras_vg.cli; "
             "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert fmt.axis_of("dead_fraction") == fmt.AXIS_LAYER
