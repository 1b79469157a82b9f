"""The layers x steps heatmap, drawn with matplotlib (for notebooks and `keras-vg plot`).

The same picture as the TensorBoard plugin's heatmap: one row per layer (or,
with `by="variable"`, per variable) in model order (input at the top), one
column per recorded step, coloured by log10 of the statistic (viridis; the
two fractions on a linear 0-1 scale). The cells `keras_vg.detect` classifies
are marked with the patterns of `keras_vg.heatmap_marks.MARKS`, so that they
stand out in print: vanishing hatched (`///`), exploding cross-hatched and
outlined in red, non-finite magenta with dots; for the per-layer activation
statistics, dead layers hatched vertically (`|||`) and saturated ones
back-hatched (`\\\\\\`). A layer row shows the most serious class of its
variables (`keras_vg.heatmap_marks`). The legend names every mark drawn.

matplotlib is imported here only, on first use: `keras_vg` does not need it
otherwise.

Example:

>>> run = keras_vg.read_run("logs/run1")    # doctest: +SKIP
>>> run.plot()                              # doctest: +SKIP
>>> run.plot(path="heatmap.png")            # doctest: +SKIP
"""

import numpy as np

from keras_vg import detect, heatmap_marks, layer_stats
from keras_vg import format as fmt

FRACTION_STATS = fmt.ACTIVATION_STATS  # fractions in [0, 1]: a linear colour scale
NON_FINITE_COLOUR = "magenta"
UNDEFINED_COLOUR = "0.8"  # grey: an undefined update ratio, or no record

# How matplotlib draws each pattern of `heatmap_marks.MARKS`: (hatch, face colour, edge colour).
# The edge colour is the hatch's; only exploding cells also get an outline. Vanishing cells
# are dark, so white lines; dead and saturated ones (fractions >= 0.5) are bright, so black.
_PATTERNS = {
    "diagonal": ("///", "none", "white"),
    "cross": ("xx", "none", "red"),
    "dots": ("..", NON_FINITE_COLOUR, "black"),
    "vertical": ("|||", "none", "black"),
    "antidiagonal": ("\\\\\\", "none", "black"),
}

def plot_run(run, stat="grad_norm", path=None, ax=None, thresholds=None, by="layer"):
    """Draws a run's heatmap of one statistic, with the detected regions marked.

    Args:
        run: A `keras_vg.reader.Run`.
        stat: A per-variable or per-layer statistic from
            `keras_vg.format.STATS`. Defaults to `"grad_norm"`.
        path: If given, the figure is also saved there (the format follows
            the extension, e.g. `.png`, `.svg`, `.pdf`). Defaults to `None`.
        ax: A matplotlib `Axes` to draw into, or None for a new figure.
            Defaults to `None`.
        thresholds: A `keras_vg.detect.Thresholds` for the marks, or None
            for the defaults. Defaults to `None`.
        by: `"layer"` for one row per layer (a per-variable statistic
            combined as `Run.stat(stat, by="layer")` combines it), or
            `"variable"` for one row per variable. Per-layer statistics have
            layer rows either way. Defaults to `"layer"`.

    Returns:
        The matplotlib `Figure`. A new figure is not registered with pyplot,
        so a notebook shows it once, as the cell's value.

    Raises:
        ValueError: if `stat` is a scalar statistic or unknown, or `by` is
            neither `"layer"` nor `"variable"`.
        KeyError: if the run did not record `stat` (or, for `update_ratio`
            per layer, `weight_norm`).

    Example:

    >>> fig = plot_run(read_run("logs/run1"), path="heatmap.png")   # doctest: +SKIP
    >>> fig = plot_run(read_run("logs/run1"), by="variable")         # doctest: +SKIP
    """
    if fmt.axis_of(stat) not in (fmt.AXIS_VARIABLE, fmt.AXIS_LAYER):
        per = [s for s in fmt.STATS if fmt.axis_of(s) in (fmt.AXIS_VARIABLE, fmt.AXIS_LAYER)]
        raise ValueError(f"`stat` must be a per-variable or per-layer statistic, one of {per}. "
                         f"Received: stat={stat!r}")
    heatmap_marks.check_view(by)
    from matplotlib import colors, patches
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    steps, names, values = run.stat(stat, by=by)
    codes = _codes(run, stat, by, steps, names, thresholds)
    T, N = values.shape

    if ax is None:
        figure = Figure(figsize=(10, max(3.0, min(12.0, 1.5 + 0.22 * N))), layout="constrained")
        ax = figure.add_subplot()
    figure = ax.figure

    linear = stat in FRACTION_STATS
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = values if linear else np.log10(values)
    finite = shown[np.isfinite(shown)]
    low, high = (0.0, 1.0) if linear else _range(finite)
    if not linear:
        shown = np.where(values == 0, low, shown)  # an exact 0 (a dead layer) is the lowest colour
    absent = stat in heatmap_marks.NAN_IS_ABSENT
    cmap = colors.ListedColormap(_viridis()).with_extremes(bad=UNDEFINED_COLOUR if absent else NON_FINITE_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(shown.T), aspect="auto", interpolation="nearest", cmap=cmap,
                      vmin=low, vmax=high, extent=(-0.5, T - 0.5, N - 0.5, -0.5))
    colorbar = figure.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label(stat if linear else f"log10 {stat}")

    legend = []
    for code in heatmap_marks.classes_shown(stat):
        name = detect.CLASS_NAMES[code]
        hatch, face, edge = _PATTERNS[heatmap_marks.MARKS[name]]
        boxes = [patches.Rectangle((start - 0.5, row - 0.5), stop - start, 1.0)
                 for row, start, stop in _runs(codes == code)]
        if not boxes:
            continue
        ax.add_collection(PatchCollection(boxes, facecolor=face, edgecolor=edge, hatch=hatch,
                                          linewidth=1.0 if name in heatmap_marks.OUTLINED else 0.0))
        legend.append(patches.Patch(facecolor="0.4" if face == "none" else face, edgecolor=edge,
                                    hatch=hatch, label=name))
    if np.isnan(values).any() or (not absent and np.isinf(values).any()):
        # The colour of values that have none on the scale.
        legend.append(patches.Patch(facecolor=UNDEFINED_COLOUR if absent else NON_FINITE_COLOUR,
                                    label="undefined / no record" if absent else "non-finite value"))
    if legend:
        # Above the cells, beside the title, so that it hides none of them.
        ax.legend(handles=legend, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(legend),
                  fontsize="small", frameon=False, borderaxespad=0.2)

    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(N - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(8, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: str(steps[int(x)]) if 0 <= int(x) < T else ""))
    every = max(1, int(np.ceil(N / 40)))  # at most ~40 labels stay readable
    ax.set_yticks(range(0, N, every))
    ax.set_yticklabels([_short(names[i]) for i in range(0, N, every)], fontsize="small")
    ax.set_xlabel("step")
    rows = "variable" if fmt.axis_of(stat) == fmt.AXIS_VARIABLE and by == "variable" else "layer"
    ax.set_ylabel(rows)
    ax.set_title(f"{stat} per {rows}: {run.log_dir}", fontsize="medium", loc="left")
    if path is not None:
        figure.savefig(path)
    return figure


def _codes(run, stat, by, steps, names, thresholds):
    """`detect`'s classes on the heatmap's `[T, N]` cells (`keras_vg.heatmap_marks`)."""
    classification = detect.classify(run, thresholds)
    if by == "variable" or fmt.axis_of(stat) == fmt.AXIS_LAYER:
        return heatmap_marks.cell_classes(classification, stat, steps, names)
    _, variables, _ = run.stat(stat)
    owners = layer_stats.variable_layers(variables, run.model())
    layers, codes = heatmap_marks.by_layer(heatmap_marks.cell_classes(classification, stat, steps, variables),
                                           owners)
    # On the rows `Run.stat` gave: the same layers, unless a model summary of an earlier fit
    # named some variables differently (the summary here is the last one).
    return heatmap_marks.reindex(codes, steps, layers, steps, names, fill=0)


def _runs(mask):
    """Yields `(row, start, stop)` for each run of True cells along the steps of `mask [T, N]`."""
    for row in range(mask.shape[1]):
        padded = np.concatenate([[False], mask[:, row], [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        for start, stop in zip(edges[::2], edges[1::2]):
            yield row, int(start), int(stop)


def _range(finite):
    if not finite.size:
        return -1.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return (low - 0.5, high + 0.5) if low == high else (low, high)


def _short(name):
    """Drops the model's name from a variable path: `sequential/dense/kernel` -> `dense/kernel`."""
    parts = name.split("/")
    return "/".join(parts[1:]) if len(parts) > 2 else name


def _viridis():
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 1, 256))
