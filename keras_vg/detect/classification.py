"""Whole runs: `classify` judges every recorded cell of a run, `zero_gradients` names the structural zeros.

`classify` aligns the statistics of a run on one grid per axis (variables,
layers, the global norm) and applies the rules (`kernels`) to all of its
rows at once.
"""

import dataclasses

import numpy as np

from keras_vg import format as fmt
from keras_vg.detect.kernels import (
    _empty,
    _global_verdicts,
    _history,
    _judge_variables,
    _layer_verdicts,
    _skipped_verdicts,
    _top,
)
from keras_vg.detect.rules import GLOBAL_STAT, LAYER_STATS, SKIPPED_STAT, VARIABLE_STATS
from keras_vg.detect.structure import Structure
from keras_vg.detect.thresholds import Thresholds


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """The verdicts on one axis: a class and the rule behind it for every cell.

    Attributes:
        scope: `"variable"`, `"layer"` or `"global"`.
        steps: int64 `[T]`, the recorded steps.
        names: The `N` variable paths or layer names, in model order.
        codes: int8 `[T, N]`, a class code per cell (`CLASS_NAMES`).
        rules: int8 `[T, N]`, the rule that set the code (`RULE_NAMES`).
        figures: float32 `[T, N]`, what that rule measured (NaN where none
            fired): the norm ratio for `vanishing`, the multiple of the
            baseline for `spike`, the fraction for `dead`, and so on.
    """

    scope: str
    steps: np.ndarray
    names: tuple
    codes: np.ndarray
    rules: np.ndarray
    figures: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Classification:
    """What `classify` returns.

    Attributes:
        variables: Per-variable classes (healthy, vanishing, exploding,
            nonfinite): each layer's verdict given to its variables, and
            each variable's own non-finite values.
        layers: Per-layer classes (healthy, dead, saturated).
        global_norm: The global grad norm's classes (nonfinite, exploding),
            one column named `global_grad_norm`.
        updates: The "stalled" findings on the variable grid; its codes are
            all healthy, since a stalled layer is a consequence, not a
            gradient class.
        skipped: The steps `keras_vg.AutoClip` skipped (rule `skipped`, the
            count as figure), one column named `skipped`.
        structure: The `Structure` of the variables.
        thresholds: The `Thresholds` used.
    """

    variables: Grid
    layers: Grid
    global_norm: Grid
    updates: Grid
    skipped: Grid
    structure: Structure
    thresholds: Thresholds

    steps = property(lambda self: self.variables.steps)
    names = property(lambda self: self.variables.names)
    codes = property(lambda self: self.variables.codes)
    layer_steps = property(lambda self: self.layers.steps)
    layer_names = property(lambda self: self.layers.names)
    layer_codes = property(lambda self: self.layers.codes)


def _axis(stats, wanted, scalar=False):
    """Aligns the `wanted` statistics present onto one grid of steps and names."""
    present = [s for s in wanted if s in stats]
    if not present:
        return np.zeros(0, np.int64), (), {s: None for s in wanted}
    entries = {s: stats[s] for s in present}
    steps = np.unique(np.concatenate([np.asarray(e[0], np.int64) for e in entries.values()]))
    if scalar:
        names = (present[0],)
    else:
        names = tuple(fmt.merge_names([list(e[1]) for e in entries.values()]))
    arrays = {}
    for stat in wanted:
        if stat not in entries:
            arrays[stat] = None
            continue
        s, n, v = entries[stat]
        s = np.asarray(s, np.int64)
        n = list(names) if scalar else list(n)
        v = np.asarray(v, np.float32).reshape(len(s), len(n))
        if np.array_equal(s, steps) and tuple(n) == names:
            arrays[stat] = v
            continue
        index = {name: i for i, name in enumerate(names)}
        out = np.full((len(steps), len(names)), np.nan, np.float32)
        out[np.ix_(np.searchsorted(steps, s), [index[x] for x in n])] = v
        arrays[stat] = out
    return steps, names, arrays


def _at(steps, source):
    """A scalar statistic `(steps, values [S, 1])` on other `steps` `[T]` (NaN where not recorded)."""
    source_steps, values = source
    out = np.full(len(steps), np.nan, np.float32)
    if len(source_steps):
        where = np.clip(np.searchsorted(source_steps, steps), 0, len(source_steps) - 1)
        found = source_steps[where] == steps
        out[found] = values[where[found], 0]
    return out


def _read(stats):
    """The statistics `classify` uses and the model summary, from a dict or a `reader.Run`."""
    if hasattr(stats, "stat") and hasattr(stats, "stats"):  # a reader.Run
        wanted = VARIABLE_STATS + LAYER_STATS + (GLOBAL_STAT, SKIPPED_STAT)
        model = stats.model() if hasattr(stats, "model") else None
        return {name: stats.stat(name) for name in stats.stats() if name in wanted}, model
    return stats, None


def classify(stats, thresholds=None, model=None):
    """Classifies every recorded cell of a run.

    Args:
        stats: A mapping from statistic name to `(steps, names, values)` as
            `keras_vg.reader.Run.stat` returns it, or a `Run` itself (whose
            model summary is then used). Any subset of the statistics may be
            present: `grad_norm` feeds the vanishing and exploding classes,
            `grad_nonfinite` the nonfinite one, `update_ratio` (with
            `weight_norm`, to combine a layer's kernels) the exploding and
            stalled rules, `dead_fraction` and `saturation_fraction` the
            layer classes, `global_grad_norm` the global ones, `skipped`
            (AutoClip's) the skipped steps. Others are ignored.
        thresholds: A `Thresholds`. Defaults to `Thresholds()`.
        model: The model summary (`Run.model()`), or None to group the
            variables by their paths. Defaults to `None` (a `Run`'s own).

    Returns:
        A `Classification`.

    Example:

    >>> from keras_vg.detect import CLASS_NAMES
    >>> steps, names = [0, 1], ["a/kernel", "b/kernel"]
    >>> result = classify({"grad_norm": (steps, names, [[1e-6, 1.0], [1e-6, 1.0]])})
    >>> [CLASS_NAMES[c] for c in result.codes[0]]
    ['vanishing', 'healthy']
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"`thresholds` must be a Thresholds. Received: thresholds={th!r}")
    stats, run_model = _read(stats)
    model = model if model is not None else run_model

    steps, names, v = _axis(stats, VARIABLE_STATS)
    structure = Structure(names, model)
    skipped_steps, _, s = _axis(stats, (SKIPPED_STAT,), scalar=True)
    skipped = s[SKIPPED_STAT]
    if len(steps) and len(names):
        units = structure.unit_norms(v["grad_norm"]) if v["grad_norm"] is not None else None
        top = _top(units) if units is not None else np.full(len(steps), np.nan, np.float32)
        rows = dict(v, units=units, skipped=_at(steps, (skipped_steps, skipped)) if skipped is not None else None)
        verdicts, updates = _judge_variables(structure, rows, top, _history(units, top, th.baseline_window), th)
    else:
        verdicts = updates = _empty((len(steps), len(names)))
    variables = Grid("variable", steps, names, *verdicts)
    updates = Grid("variable", steps, names, *updates)

    layer_steps, layer_names, a = _axis(stats, LAYER_STATS)
    layer_verdicts = (_layer_verdicts(a["dead_fraction"], a["saturation_fraction"],
                                      structure.layer_guards(layer_names), th)
                      if len(layer_steps) and len(layer_names) else
                      _empty((len(layer_steps), len(layer_names))))
    layers = Grid("layer", layer_steps, layer_names, *layer_verdicts)

    global_steps, _, g = _axis(stats, (GLOBAL_STAT,), scalar=True)
    global_verdicts = (_global_verdicts(g[GLOBAL_STAT], th) if len(global_steps)
                       else _empty((0, 1)))
    global_norm = Grid("global", global_steps, (GLOBAL_STAT,), *global_verdicts)
    skipped = Grid("global", skipped_steps, (SKIPPED_STAT,),
                   *(_skipped_verdicts(skipped) if len(skipped_steps) else _empty((0, 1))))
    return Classification(variables, layers, global_norm, updates, skipped, structure, th)


def zero_gradients(stats, model=None, thresholds=None):
    """The variables whose gradient is zero by construction: information, not a finding.

    Two sources agree here. The model summary names the variables whose
    gradient the architecture makes zero (`structural_zeros`: a bias before
    BatchNormalization, attention's key bias), and the records give the
    figure. Where the summary cannot know (no summary, or a layer whose
    graph it could not read: a subclassed model's), the records alone show
    them: a bias, scale or offset whose grad norm stays below
    `structural_ratio` of its layer's kernels' at every record (at least
    `min_records` of them). Where the graph is known and says nothing, a
    tiny ratio is the scale of the activations (an exploding layer's huge
    inputs), not a zero by construction.

    Args:
        stats: As `classify` takes them, or a `reader.Run`.
        model: The model summary, or None (a `Run`'s own). Defaults to `None`.
        thresholds: A `Thresholds`. Defaults to `Thresholds()`.

    Returns:
        A list, in model order, of dicts with `variable`, `layer`, `ratio`
        (the largest ratio to the layer's kernels seen in the records, or
        None where `grad_norm` does not tell), `reason` and `by` (from the
        summary, or None when only the records show it).

    Example:

    >>> norms = [[1.0, 1e-9], [2.0, 3e-9]]
    >>> [z["variable"] for z in zero_gradients({"grad_norm": ([0, 1], ["d/kernel", "d/bias"], norms)})]
    ['d/bias']
    """
    th = thresholds if thresholds is not None else Thresholds()
    stats, run_model = _read(stats)
    model = model if model is not None else run_model
    _, names, v = _axis(stats, ("grad_norm",))
    structure = Structure(names, model)
    ratios = _ratios_to_kernels(structure, v["grad_norm"], th.min_records)
    out = []
    for j, name in enumerate(names):
        entry = structure.structural.get(name)
        measured = None if np.isnan(ratios[j]) else float(ratios[j])
        if entry is None and (measured is None or measured >= th.structural_ratio
                              or structure.graph_known(structure.layers[j])):
            continue
        out.append({"variable": name, "layer": structure.layers[j], "ratio": measured,
                    "reason": entry.get("reason") if entry else None, "by": entry.get("by") if entry else None})
    return out


def _ratios_to_kernels(structure, norm, min_records):
    """The largest ratio of each non-kernel variable's grad norm to its layer's kernels' `[N]`.

    NaN for kernels, for variables of a layer without kernels, and where
    fewer than `min_records` records have both norms finite.
    """
    ratios = np.full(len(structure.names), np.nan)
    if norm is None or not len(structure.units):
        return ratios
    units = structure.unit_norms(norm)
    column = {unit: i for i, unit in enumerate(structure.units)}
    for j, (layer, role) in enumerate(zip(structure.layers, structure.roles)):
        if role == "kernel" or layer not in column:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            r = norm[:, j] / units[:, column[layer]]
        r = r[np.isfinite(r)]
        if len(r) >= min_records:
            ratios[j] = r.max()
    return ratios
