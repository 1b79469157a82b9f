"""What marks a heatmap's cells: `keras_vg.detect`'s classes lined up with its rows and steps. numpy only.

`keras_vg.plot` and the TensorBoard plugin draw the same layers x steps
heatmap: one statistic, one row per layer (or per variable), one column per
recorded step. `keras_vg.detect` classifies a run once, on its own grids:
every variable at every step (vanishing, exploding, nonfinite) and every layer
with activation records (dead, saturated). This module puts those classes on a
heatmap's cells, so both pictures mark the same cells the same way:

| heatmap rows | statistic | a cell's class |
|---|---|---|
| variables | per variable (`grad_norm`, `update_ratio`, ...) | the variable's class at that step |
| layers | per variable, combined per layer | the most serious of its variables' classes, by `detect`'s precedence |
| layers | per layer (`dead_fraction`, `saturation_fraction`) | the layer's class (dead, saturated) |

A cell neither grid covers (a step or a name `detect` did not see) is healthy.

`keras_vg.detect` is imported on first use only: the TensorBoard plugin
imports this module at start-up (for `NAN_IS_ABSENT`), and the rules are not
needed until a heatmap is asked for.

Example:

>>> from keras_vg import detect
>>> result = detect.classify({"grad_norm": ([0], ["d/kernel", "d/bias", "e/kernel"], [[1e-9, 1.0, 1.0]])})
>>> cell_classes(result, "grad_norm", [0], ["d/kernel", "d/bias", "e/kernel"], layers=["d", "d", "e"]).tolist()
[[1, 0]]
"""

import numpy as np

from keras_vg import format as fmt

VIEWS = ("layer", "variable")
"""The rows a heatmap can have; `"layer"` is the default everywhere."""

NAN_IS_ABSENT = frozenset({"update_ratio", "dead_fraction", "saturation_fraction"})
"""Statistics whose NaN means "no value" (an undefined update ratio, a layer
without a record), not a non-finite number. Elsewhere a NaN is a broken
gradient and must stand out; here it is drawn as "undefined" and never wins a
downsampled bucket."""

MARKS = {
    "vanishing": "diagonal",
    "exploding": "cross",
    "nonfinite": "dots",
    "dead": "vertical",
    "saturated": "antidiagonal",
}
"""The pattern each class is marked with, by class name: hatching, so that the
marks read in monochrome too. The plugin's canvas and matplotlib draw these
names each their own way."""

OUTLINED = frozenset({"exploding"})
"""Classes whose regions are outlined as well as patterned, so that exploding
regions differ from vanishing ones at a glance."""

RINGED = frozenset({"exploding", "nonfinite"})
"""Classes whose cells get a ring where cells are tiny (the dashboard's canvas):
one step of one row must not hide among a million cells."""

_GRID_CLASSES = {
    fmt.AXIS_VARIABLE: ("vanishing", "exploding", "nonfinite"),
    fmt.AXIS_LAYER: ("dead", "saturated"),
}
"""The classes of each `detect` grid, by the axis of the statistics it judges."""


def check_view(by):
    """Raises ValueError unless `by` is one of `VIEWS`."""
    if by not in VIEWS:
        raise ValueError(f"`by` must be one of {list(VIEWS)}. Received: by={by!r}")


def precedence():
    """Class codes, most serious first, in `detect`'s order: nonfinite, exploding, vanishing, dead, saturated, healthy.

    Returns:
        A tuple of every code of `detect.CLASS_NAMES` (`detect.CLASS_PRECEDENCE`).

    Example:

    >>> from keras_vg import detect
    >>> [detect.CLASS_NAMES[c] for c in precedence()]
    ['nonfinite', 'exploding', 'vanishing', 'dead', 'saturated', 'healthy']
    """
    from keras_vg import detect

    return detect.CLASS_PRECEDENCE


def classes_shown(stat):
    """The class codes a heatmap of `stat` can mark, most serious first.

    Args:
        stat: A per-variable or per-layer statistic.

    Returns:
        A tuple of codes (healthy not included).
    """
    from keras_vg import detect

    names = _GRID_CLASSES[fmt.axis_of(stat)]
    return tuple(code for code in precedence() if detect.CLASS_NAMES[code] in names)


def worst(codes, groups, axis):
    """Reduces class codes over groups of positions along an axis; the most serious code wins.

    Args:
        codes: int8 array of class codes.
        groups: int array, the group of each position along `axis`, labelled
            `0 .. G-1` (every label present, in any order).
        axis: The axis to reduce.

    Returns:
        int8 array with that axis replaced by one entry per group.

    Example:

    >>> worst(np.array([[1, 0, 3]], np.int8), [0, 1, 0], axis=1).tolist()
    [[3, 0]]
    """
    groups = np.asarray(groups, dtype=np.intp)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]) if len(groups) else groups
    return worst_in_runs(np.take(codes, order, axis=axis), starts, axis)


def worst_in_runs(codes, starts, axis):
    """Reduces class codes over contiguous runs of positions along an axis; the most serious code wins.

    Args:
        codes: int8 array of class codes.
        starts: The first position of each run, increasing, starting at 0.
        axis: The axis to reduce.

    Returns:
        int8 array with that axis replaced by one entry per run.

    Example:

    >>> worst_in_runs(np.array([[0, 1, 3, 0]], np.int8), np.array([0, 2]), axis=1).tolist()
    [[1, 3]]
    """
    codes = np.asarray(codes, dtype=np.int8)
    if codes.shape[axis] == 0 or len(starts) == codes.shape[axis]:
        return codes
    order = precedence()
    # Rank each code (larger: more serious), take the max, map back.
    rank_of = np.zeros(128, dtype=np.int8)
    rank_of[list(reversed(order))] = np.arange(len(order), dtype=np.int8)
    code_of = np.array(list(reversed(order)), dtype=np.int8)
    return code_of[np.maximum.reduceat(rank_of[codes], starts, axis=axis)]


def align(grid, steps, names):
    """A `detect` grid's codes on other steps and names.

    Args:
        grid: A `detect.Grid` (or anything with `steps`, `names` and int8
            `codes [T', N']`).
        steps: int array `[T]`, the steps of the heatmap.
        names: The `N` row names of the heatmap.

    Returns:
        int8 array `[T, N]`: the grid's code where it has the step and the
        name, 0 (healthy) elsewhere.
    """
    return reindex(np.asarray(grid.codes, dtype=np.int8), grid.steps, grid.names, steps, names, fill=0)


def reindex(values, from_steps, from_names, steps, names, fill):
    """Values `[T', N']` on steps and names of their own, put on other steps and names.

    Args:
        values: array `[T', N']`.
        from_steps: int `[T']`, increasing: the steps of `values`' rows.
        from_names: The `N'` names of `values`' columns.
        steps: int `[T]`, the steps wanted.
        names: The `N` names wanted.
        fill: The value where `values` has no such step or name.

    Returns:
        array `[T, N]` of `values`' dtype (`values` itself when the axes are the same).

    Example:

    >>> reindex(np.array([[1.0, 2.0]]), [5], ["a", "b"], [4, 5], ["b", "c"], fill=np.nan).tolist()
    [[nan, nan], [2.0, nan]]
    """
    values = np.asarray(values)
    from_steps = np.asarray(from_steps, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    if tuple(names) == tuple(from_names) and np.array_equal(steps, from_steps):
        return values  # the usual case: the same axes
    out = np.full((len(steps), len(names)), fill, dtype=values.dtype)
    if not len(from_steps) or not len(from_names) or not len(steps):
        return out
    where = np.clip(np.searchsorted(from_steps, steps), 0, len(from_steps) - 1)
    found = from_steps[where] == steps
    column = {name: i for i, name in enumerate(from_names)}
    columns = np.array([column.get(name, -1) for name in names], dtype=np.intp)
    have = columns >= 0
    out[np.ix_(found, have)] = values[np.ix_(where[found], columns[have])]
    return out


def by_layer(codes, layers):
    """Each layer's class at each step: the most serious of its variables'.

    Args:
        codes: int8 `[T, N]`, the variables' classes.
        layers: The layer of each of the `N` variables
            (`keras_vg.layer_stats.variable_layers`).

    Returns:
        `(layer_names, layer_codes)`: the `L` layers in the order their first
        variable comes (as `keras_vg.layer_stats.by_layer` orders them), and
        int8 `[T, L]`.
    """
    names = list(dict.fromkeys(layers))
    index = {name: i for i, name in enumerate(names)}
    return names, worst(codes, [index[layer] for layer in layers], axis=1)


def cell_classes(classification, stat, steps, names, layers=None):
    """The class of every cell of a heatmap of one statistic.

    Args:
        classification: What `detect.classify` returned for the run (or
            anything with `variables` and `layers` grids).
        stat: The statistic shown.
        steps: int `[T]`, the heatmap's steps.
        names: For a per-variable statistic, the variable paths (also when
            the rows are layers); for a per-layer one, the layer names.
        layers: None for one row per name; for layer rows of a per-variable
            statistic, the layer of each name.

    Returns:
        int8 `[T, R]`: a code of `detect.CLASS_NAMES` per cell, R being
        `len(names)` or the number of layers.
    """
    if fmt.axis_of(stat) == fmt.AXIS_LAYER:
        return align(classification.layers, steps, names)
    codes = align(classification.variables, steps, names)
    return codes if layers is None else by_layer(codes, layers)[1]
