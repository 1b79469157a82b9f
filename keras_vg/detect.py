"""Region rules: where and when gradients vanish, explode, go non-finite or die.

This is the one place that decides what is unhealthy. The `GradientMonitor`
callback (through `StreamingDetector`), the report and CLI and the TensorBoard
plugin (through `classify` and `find_episodes`) all call it, so they always
agree. It imports numpy and the standard library only.

Every cell (a variable or a layer at a recorded step) gets a class:

| code | name        | when (the numbers are `Thresholds` fields)                       |
|------|-------------|------------------------------------------------------------------|
| 0    | `healthy`   | none of the below                                                |
| 1    | `vanishing` | grad norm < `vanishing_ratio` x the step's largest grad norm      |
| 2    | `exploding` | grad norm > `spike_factor` x the median of its previous records,  |
|      |             | or > `exploding_norm`; or update ratio > `exploding_update_ratio` |
| 3    | `nonfinite` | NaN/inf in the gradient                                          |
| 4    | `dead`      | a layer's `dead_fraction` >= `dead_fraction`                      |
| 5    | `saturated` | a layer's `saturation_fraction` >= `saturation_fraction`          |

Where several hold, the more serious wins: nonfinite > exploding > vanishing,
and dead > saturated. Beside the classes, a "stalled" finding marks variables
whose applied update is negligible (below float32 resolution, or far below the
upper half of the network). `docs/DETECTION.md` gives the sources of every
default.

Example:

>>> from keras_vg.reader import read_run                   # doctest: +SKIP
>>> result = classify(read_run("logs/run1"))                # doctest: +SKIP
>>> for episode in find_episodes(result):                   # doctest: +SKIP
...     print(episode.message)
"""

import dataclasses
import functools
import numbers
from typing import NamedTuple

import numpy as np

HEALTHY, VANISHING, EXPLODING, NONFINITE, DEAD, SATURATED = range(6)
CLASS_NAMES = ("healthy", "vanishing", "exploding", "nonfinite", "dead", "saturated")
"""Cell class names, indexed by code."""

KINDS = ("nonfinite", "exploding", "vanishing", "dead", "saturated", "stalled")
"""Episode kinds, most serious first."""

SCOPES = ("variable", "layer", "global")

VARIABLE_STATS = ("grad_norm", "grad_nonfinite", "update_ratio")
LAYER_STATS = ("dead_fraction", "saturation_fraction")
GLOBAL_STAT = "global_grad_norm"


class _Rule(NamedTuple):
    name: str
    kind: str
    code: int
    worst: np.ufunc  # reduces an episode's figures to the worst one
    threshold: str  # the `Thresholds` field the figure is compared with
    text: str  # describes the worst figure `f` against the threshold `t`


# A rule's id is its index here. Ids are in precedence order, so the lowest id
# that fires on a cell wins it, and each kind's ids are contiguous.
_RULES = (
    None,
    _Rule("nonfinite", "nonfinite", NONFINITE, np.fmax, "",
          "up to {f:.0f} NaN/inf values in one gradient"),
    _Rule("spike", "exploding", EXPLODING, np.fmax, "spike_factor",
          "gradient norm up to {f:.3g}x the median of its previous records (threshold {t:g}x)"),
    _Rule("grad_norm", "exploding", EXPLODING, np.fmax, "exploding_norm",
          "gradient norm up to {f:.3g} (threshold {t:g})"),
    _Rule("update_ratio", "exploding", EXPLODING, np.fmax, "exploding_update_ratio",
          "one update changed the weights by up to {f:.3g}x their norm (threshold {t:g})"),
    _Rule("vanishing", "vanishing", VANISHING, np.fmin, "vanishing_ratio",
          "gradient norm down to {f:.2g} of the largest at the same step (threshold {t:g})"),
    _Rule("dead", "dead", DEAD, np.fmax, "dead_fraction",
          "up to {f:.0%} of units never fired (threshold {t:.0%})"),
    _Rule("saturated", "saturated", SATURATED, np.fmax, "saturation_fraction",
          "up to {f:.0%} of activations at an asymptote (threshold {t:.0%})"),
    _Rule("below_resolution", "stalled", HEALTHY, np.fmin, "resolution_ratio",
          "update ratio down to {f:.2g}, below float32 resolution ({t:.2g}): "
          "these weights are not changing"),
    _Rule("stalled", "stalled", HEALTHY, np.fmin, "stalled_ratio",
          "update ratio down to {f:.2g} of the upper half's median (threshold {t:g}): "
          "these weights barely change"),
)
RULE_NAMES = ("",) + tuple(rule.name for rule in _RULES[1:])
"""Names of the values in `Grid.rules` (0: no rule fired)."""

_ID = {name: i for i, name in enumerate(RULE_NAMES)}
_CODE_OF_RULE = np.array([0] + [rule.code for rule in _RULES[1:]], dtype=np.int8)
_KIND_IDS = {
    kind: (min(i for i, r in enumerate(_RULES) if r and r.kind == kind),
           max(i for i, r in enumerate(_RULES) if r and r.kind == kind))
    for kind in KINDS
}


def _check(thresholds, name, ok, constraint, optional=False, integer=False):
    value = getattr(thresholds, name)
    if optional and value is None:
        return
    valid_type = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, valid_type) or not ok(value):
        none = " or None" if optional else ""
        raise ValueError(f"`{name}` must be {constraint}{none}. Received: {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The numbers behind every rule. Sources in `docs/DETECTION.md`.

    Args:
        vanishing_ratio: A variable vanishes at a step where its grad norm is
            below this fraction of the largest grad norm at that step
            (AUTOTRAINER's first/last-layer ratio). Defaults to `1e-3`.
        spike_factor: A variable explodes where its grad norm exceeds this
            multiple of the median of its own previous records. Defaults
            to `10`.
        baseline_window: How many previous records that median spans.
            Defaults to `20`.
        min_history: Usable records (finite, and not vanishing at their own
            step) needed in the window before the spike and update-ratio
            rules judge a variable. Defaults to `5`.
        exploding_norm: A variable's or the global grad norm above this
            explodes whatever its history; None turns the rule off.
            Defaults to `1e3`.
        exploding_update_ratio: A variable explodes where one step changed
            it by more than this multiple of its own norm; None turns the
            rule off. Defaults to `1.0`.
        dead_fraction: A layer is dead where at least this fraction of its
            units never fired since the last record. Defaults to `0.5`.
        saturation_fraction: A layer is saturated where at least this
            fraction of its activations sat at an asymptote. Defaults to
            `0.5`.
        stalled_ratio: A variable is stalled where its update ratio is below
            this fraction of the median update ratio of the upper half of
            the variables of its role (kernels, biases, ...), and it lies
            in the lower half; None turns the rule off. Defaults to `1e-2`.
        resolution_ratio: A variable is stalled where its update ratio is
            below this (float32's machine epsilon: the update is lost to
            rounding); None turns the rule off. Defaults to `2**-23`.
        merge_gap: Records without a finding that may separate two findings
            of the same kind within one episode. Defaults to `5`.

    Example:

    >>> Thresholds(vanishing_ratio=1e-4).spike_factor
    10.0
    """

    vanishing_ratio: float = 1e-3
    spike_factor: float = 10.0
    baseline_window: int = 20
    min_history: int = 5
    exploding_norm: float | None = 1e3
    exploding_update_ratio: float | None = 1.0
    dead_fraction: float = 0.5
    saturation_fraction: float = 0.5
    stalled_ratio: float | None = 1e-2
    resolution_ratio: float | None = 2.0**-23
    merge_gap: int = 5

    def __post_init__(self):
        _check(self, "vanishing_ratio", lambda v: 0 < v < 1, "in (0, 1)")
        _check(self, "spike_factor", lambda v: 1 < v < np.inf, "a finite number > 1")
        _check(self, "baseline_window", lambda v: v >= 1, "an integer >= 1", integer=True)
        _check(self, "exploding_norm", lambda v: v > 0, "> 0", optional=True)
        _check(self, "exploding_update_ratio", lambda v: v > 0, "> 0", optional=True)
        _check(self, "dead_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
        _check(self, "saturation_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
        _check(self, "stalled_ratio", lambda v: 0 < v < 1, "in (0, 1)", optional=True)
        _check(self, "resolution_ratio", lambda v: 0 < v < 1, "in (0, 1)", optional=True)
        _check(self, "merge_gap", lambda v: v >= 0, "an integer >= 0", integer=True)
        if (isinstance(self.min_history, bool) or not isinstance(self.min_history, numbers.Integral)
                or not 1 <= self.min_history <= self.baseline_window):
            raise ValueError(
                "`min_history` must be an integer in [1, baseline_window]. Received: "
                f"min_history={self.min_history!r}, baseline_window={self.baseline_window!r}"
            )


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
            nonfinite).
        layers: Per-layer classes (healthy, dead, saturated).
        global_norm: The global grad norm's classes (nonfinite, exploding),
            one column named `global_grad_norm`.
        updates: The "stalled" findings on the variable grid; its codes are
            all healthy, since a stalled variable is a consequence, not a
            gradient class.
        thresholds: The `Thresholds` used.
    """

    variables: Grid
    layers: Grid
    global_norm: Grid
    updates: Grid
    thresholds: Thresholds

    steps = property(lambda self: self.variables.steps)
    names = property(lambda self: self.variables.names)
    codes = property(lambda self: self.variables.codes)
    layer_steps = property(lambda self: self.layers.steps)
    layer_names = property(lambda self: self.layers.names)
    layer_codes = property(lambda self: self.layers.codes)


@dataclasses.dataclass(frozen=True)
class Episode:
    """A contiguous region of one kind of finding.

    Attributes:
        kind: One of `KINDS`.
        scope: `"variable"`, `"layer"` or `"global"`.
        names: The variables or layers concerned, in model order.
        first_step: The first recorded step of the episode.
        last_step: The last recorded step (so far, for a streaming episode).
        rule: The rule behind `figure` (a name from `RULE_NAMES`): where
            several rules of the kind fired, the most serious.
        figure: The worst value that rule measured in the episode (NaN if
            unknown, e.g. a non-finite norm without `grad_nonfinite`).
        threshold: The threshold it was compared with.
        message: One line for a person to read.
    """

    kind: str
    scope: str
    names: tuple
    first_step: int
    last_step: int
    rule: str
    figure: float
    threshold: float
    message: str

    @property
    def first_name(self):
        return self.names[0] if self.names else ""

    @property
    def last_name(self):
        return self.names[-1] if self.names else ""


# ---------------------------------------------------------------------------
# The rules. `classify` applies them to whole runs and `StreamingDetector` to
# batches of rows as they arrive; both go through these functions.


def _nanmedian_rows(x):
    """Median of the finite values of each row of `x`, and their count.

    Sorting once serves rows of any length; np.nanmedian loops in Python over
    long rows.
    """
    x = np.where(np.isfinite(x), x, np.nan)
    count = np.count_nonzero(~np.isnan(x), axis=1)
    x = np.sort(x, axis=1)  # NaN sorts last
    rows = np.arange(len(x))
    low, high = np.maximum(count - 1, 0) // 2, np.minimum(count // 2, x.shape[1] - 1)
    with np.errstate(invalid="ignore"):
        median = (x[rows, low] + x[rows, high]) / np.float32(2)
    return np.where(count > 0, median, np.nan).astype(np.float32), count


def _variable_verdicts(norm, count, update, top, previous_min, windows, th):
    """Applies the per-variable rules to rows of cells.

    Args:
        norm, count, update: float32 `[R, N]` grad norm, non-finite count and
            update ratio; NaN where not recorded, None where the statistic
            is absent.
        top: float32 `[R]`, `_top(norm)`.
        previous_min: float32 `[R, N]`, the smallest grad norm among each
            cell's previous `baseline_window` records (inf or NaN if none).
        windows: `windows(rows, cols) -> (records, tops)`, those previous
            records `[K, W]` and the `top` of their steps.
        th: `Thresholds`.

    Returns:
        `(codes, rules, figures)`, each `[R, N]`.
    """
    shape = next(a.shape for a in (norm, count, update) if a is not None)
    out = _Verdicts(shape)
    if not shape[1]:
        return out.result()
    nonfinite, figure = None, None
    if count is not None:
        nonfinite, figure = count > 0, (lambda i: count[i])
    elif norm is not None:  # without a count, a NaN or inf norm is the evidence
        nonfinite = ~np.isfinite(norm)
    if norm is None:
        norm = np.broadcast_to(np.float32(np.nan), shape)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # A baseline is needed only where a spike is possible (a window's
        # median is at least its minimum) or where a large update awaits the
        # warm-up check: this keeps the medians off almost every cell.
        maybe_spike = norm > th.spike_factor * previous_min
        big_update = None
        if update is not None and th.exploding_update_ratio is not None:
            big_update = update > th.exploding_update_ratio
        rows, cols = _nonzero(maybe_spike if big_update is None else maybe_spike | big_update)
        median, history = _baseline(*windows(rows, cols), th)
        warm = history >= th.min_history
        value = norm[rows, cols]
        spike = (maybe_spike[rows, cols] & warm & (median > 0)
                 & (value > th.spike_factor * median)
                 # a jump in a gradient that is still negligible is no explosion
                 & ~(value < th.vanishing_ratio * top[rows]))
        big_update = warm & (False if big_update is None else big_update[rows, cols])
        big_norm = np.broadcast_to(False, shape)
        if th.exploding_norm is not None:
            big_norm = norm > th.exploding_norm

        # An exploding variable must not make all the others look vanishing.
        sparse = spike | big_update
        hot = np.union1d(np.flatnonzero(big_norm.any(axis=1)), rows[sparse])
        exploding = big_norm[hot]
        exploding[np.searchsorted(hot, rows[sparse]), cols[sparse]] = True
        reference = top.copy()
        reference[hot] = _finite_max(np.where(exploding, np.nan, norm[hot]))
        reference = reference[:, None]

        out.put("vanishing", norm < th.vanishing_ratio * reference,
                lambda i: norm[i] / np.broadcast_to(reference, shape)[i])
        out.put("update_ratio", (rows[big_update], cols[big_update]), lambda i: update[i])
        out.put("grad_norm", big_norm, lambda i: norm[i])
        out.put("spike", (rows[spike], cols[spike]), value[spike] / median[spike])
        if nonfinite is not None:
            out.put("nonfinite", nonfinite, figure)
    return out.result()


def _finite_max(x):
    """Largest finite value of each row of `x` (NaN if none)."""
    return np.fmax.reduce(np.where(np.isfinite(x), x, np.nan), axis=1)


def _top(norm):
    """The largest finite grad norm of each row `[R, N]`: the vanishing reference."""
    if norm is None or not norm.shape[1]:
        return np.full(len(norm) if norm is not None else 1, np.nan, np.float32)
    with np.errstate(invalid="ignore"):
        top = np.fmax.reduce(norm, axis=1)
        infinite = np.flatnonzero(np.isinf(top))
        top[infinite] = _finite_max(norm[infinite])
    return top


def _baseline(records, tops, th):
    """Median and count of the usable records in each row of `records` `[K, W]`.

    Usable records are finite and were not vanishing at their own step
    (`tops` holds those steps' `_top`): a layer recovering from vanishing
    gradients is not exploding.
    """
    with np.errstate(invalid="ignore"):
        usable = np.where(records < th.vanishing_ratio * tops, np.nan, records)
    return _nanmedian_rows(usable)


def _update_verdicts(update, names, th):
    """The "stalled" findings on rows of update ratios `[R, N]`.

    Variables are compared only with others of the same role (the last part
    of their path: kernels with kernels, biases with biases), since a
    young bias naturally moves far more, relative to its size, than a
    kernel. A row where no variable moved more than `resolution_ratio` is a
    skipped step (loss scaling skips steps with non-finite gradients), not
    a stall.
    """
    out = _Verdicts(update.shape)
    res = th.resolution_ratio if th.resolution_ratio is not None else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        moving = (update > res).any(axis=1)
        for columns in _roles(tuple(names)) if th.stalled_ratio is not None else ():
            half = len(columns) // 2
            if half < 2:  # a median of one variable is no baseline
                continue
            lower, upper = update[:, columns[:half]], update[:, columns[half:]]
            # median <= max, so rows failing this test cannot stall: skip their sort
            candidates = np.flatnonzero(
                moving & (np.fmin.reduce(lower, axis=1)
                          < th.stalled_ratio * np.fmax.reduce(upper, axis=1)))
            median, _ = _nanmedian_rows(upper[candidates])
            relative = lower[candidates] / median[:, None]
            r, c = np.nonzero(relative < th.stalled_ratio)
            out.put("stalled", (candidates[r], columns[c]), relative[r, c])
        if th.resolution_ratio is not None:
            out.put("below_resolution", (update < res) & moving[:, None], lambda i: update[i])
    return out.result()


@functools.lru_cache(maxsize=8)
def _roles(names):
    """Column indices of the variables of each role (`kernel`, `bias`, ...).

    Cached: a training callback asks again for the same tuple of names at
    every read-back.
    """
    roles = {}
    for i, name in enumerate(names):
        roles.setdefault(str(name).rsplit("/", 1)[-1], []).append(i)
    columns = tuple(np.array(c) for c in roles.values())
    for c in columns:
        c.flags.writeable = False
    return columns


def _layer_verdicts(dead, saturation, th):
    """The per-layer rules on rows `[R, N]` (None where a statistic is absent)."""
    out = _Verdicts(next(a.shape for a in (dead, saturation) if a is not None))
    with np.errstate(invalid="ignore"):
        if saturation is not None:
            out.put("saturated", saturation >= th.saturation_fraction, lambda i: saturation[i])
        if dead is not None:
            out.put("dead", dead >= th.dead_fraction, lambda i: dead[i])
    return out.result()


def _global_verdicts(norm, th):
    """The global grad norm's rules on `[R, 1]`."""
    out = _Verdicts(norm.shape)
    if th.exploding_norm is not None:
        with np.errstate(invalid="ignore"):
            out.put("grad_norm", norm > th.exploding_norm, lambda i: norm[i])
    out.put("nonfinite", ~np.isfinite(norm))
    return out.result()


def _unexplained(global_rules, variable_codes):
    """Drops global verdicts that a variable of the same class already explains.

    Args:
        global_rules: int8 `[R, 1]`.
        variable_codes: int8 `[R, N]`, the variables at the same steps.
    """
    codes = _CODE_OF_RULE[global_rules]
    explained = (variable_codes == codes).any(axis=1, keepdims=True)
    return np.where(explained, 0, global_rules).astype(np.int8)


class _Verdicts:
    """Collects rule hits; `put` them in rising precedence, the last one wins."""

    def __init__(self, shape):
        self.codes = np.zeros(shape, np.int8)
        self.rules = np.zeros(shape, np.int8)
        self.figures = np.full(shape, np.nan, np.float32)

    def put(self, rule, cells, figures=None):
        """Marks `cells` (a boolean mask, or row and column arrays) with `rule`.

        `figures` is what the rule measured there: an array matching the
        cells, or a function of `cells` (so a dense figure is only computed
        at the cells that need it).
        """
        if isinstance(cells, np.ndarray):
            hits = np.count_nonzero(cells)
            if not hits:
                return
            if hits < cells.size // 64:  # scattering by index is cheaper when sparse
                cells = _nonzero(cells)
        elif not len(cells[0]):
            return
        self.rules[cells] = _ID[rule]
        self.codes[cells] = _CODE_OF_RULE[_ID[rule]]
        if callable(figures):
            figures = figures(cells)
        self.figures[cells] = np.nan if figures is None else figures

    def result(self):
        return self.codes, self.rules, self.figures


def _nonzero(mask):
    """`np.nonzero` of a 2-D mask; much faster when few rows have hits."""
    rows = np.flatnonzero(mask.any(axis=1))
    flat = np.flatnonzero(mask[rows])
    return rows[flat // mask.shape[1]], flat % mask.shape[1]


# ---------------------------------------------------------------------------
# Whole runs.


def _merge_names(lists):
    """Merges lists of names, keeping the order (model order) of each.

    A name new to the merge goes just before the next name it precedes in
    its own list, or at the end.
    """
    merged = list(lists[0]) if lists else []
    for names in lists[1:]:
        if list(names) == merged:
            continue
        known, pending = set(merged), []
        for name in names:
            if name in known:
                position = merged.index(name)
                merged[position:position] = pending
                pending = []
            else:
                pending.append(name)
        merged += pending
    return merged


def _axis(stats, wanted, scalar=False):
    """Aligns the `wanted` statistics present onto one grid of steps and names."""
    present = [s for s in wanted if s in stats]
    if not present:
        return np.zeros(0, np.int64), (), {s: None for s in wanted}
    entries = {s: stats[s] for s in present}
    steps = np.unique(np.concatenate([np.asarray(e[0], np.int64) for e in entries.values()]))
    if scalar:
        names = (GLOBAL_STAT,)
    else:
        names = tuple(_merge_names([list(e[1]) for e in entries.values()]))
    arrays = {}
    for stat in wanted:
        if stat not in entries:
            arrays[stat] = None
            continue
        s, n, v = entries[stat]
        s = np.asarray(s, np.int64)
        n = [GLOBAL_STAT] if scalar else list(n)
        v = np.asarray(v, np.float32).reshape(len(s), len(n))
        if np.array_equal(s, steps) and tuple(n) == names:
            arrays[stat] = v
            continue
        index = {name: i for i, name in enumerate(names)}
        out = np.full((len(steps), len(names)), np.nan, np.float32)
        out[np.ix_(np.searchsorted(steps, s), [index[x] for x in n])] = v
        arrays[stat] = out
    return steps, names, arrays


def _previous_min(norm, window):
    """Smallest value among each cell's previous `window` rows (NaN-ignoring).

    van Herk/Gil-Werman: a window's minimum is the minimum of a suffix-minimum
    and a prefix-minimum within window-aligned blocks, so the cost does not
    grow with the window.
    """
    T, N = norm.shape
    shifted = np.empty((T + 1, N), np.float32)  # row t+1 holds prefix[t]
    shifted[0] = np.inf
    prefix, suffix = shifted[1:], np.empty((T, N), np.float32)
    main = T - T % window
    for start, stop in ((0, main), (main, T)):
        if stop == start:
            continue
        size = min(window, stop - start)
        x, p, s = (a[start:stop].reshape(-1, size, N) for a in (norm, prefix, suffix))
        p[:, 0], s[:, -1] = x[:, 0], x[:, -1]
        for i in range(1, size):
            np.fmin(p[:, i - 1], x[:, i], out=p[:, i])
            np.fmin(s[:, -i], x[:, -i - 1], out=s[:, -i - 1])
    # Rows up to `window` see the prefix of block 0 only; later ones two blocks.
    if T > window + 1:
        np.fmin(suffix[1:T - window], prefix[window:T - 1], out=prefix[window:T - 1])
    return shifted[:T]


def classify(stats, thresholds=None):
    """Classifies every recorded cell of a run.

    Args:
        stats: A mapping from statistic name to `(steps, names, values)` as
            `keras_vg.reader.Run.stat` returns it, or a `Run` itself. Any
            subset of the statistics may be present: `grad_norm` feeds the
            vanishing and exploding classes, `grad_nonfinite` the nonfinite
            one, `update_ratio` the exploding and stalled rules,
            `dead_fraction` and `saturation_fraction` the layer classes,
            `global_grad_norm` the global ones. Others are ignored.
        thresholds: A `Thresholds`. Defaults to `Thresholds()`.

    Returns:
        A `Classification`.

    Example:

    >>> steps, names = [0, 1], ["a/kernel", "b/kernel"]
    >>> result = classify({"grad_norm": (steps, names, [[1e-6, 1.0], [1e-6, 1.0]])})
    >>> [CLASS_NAMES[c] for c in result.codes[0]]
    ['vanishing', 'healthy']
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"`thresholds` must be a Thresholds. Received: thresholds={th!r}")
    if hasattr(stats, "stat") and hasattr(stats, "stats"):  # a reader.Run
        wanted = VARIABLE_STATS + LAYER_STATS + (GLOBAL_STAT,)
        stats = {name: stats.stat(name) for name in stats.stats() if name in wanted}

    steps, names, v = _axis(stats, VARIABLE_STATS)
    norm, update = v["grad_norm"], v["update_ratio"]
    if len(steps) and len(names):
        top = _top(norm) if norm is not None else np.full(len(steps), np.nan, np.float32)
        verdicts = _variable_verdicts(norm, v["grad_nonfinite"], update, top,
                                      *_history(norm, top, th.baseline_window), th)
    else:
        verdicts = _empty((len(steps), len(names)))
    variables = Grid("variable", steps, names, *verdicts)
    if update is not None and len(names):
        updates = Grid("variable", steps, names, *_update_verdicts(update, names, th))
    else:
        updates = Grid("variable", steps, names, *_empty((len(steps), len(names))))

    layer_steps, layer_names, a = _axis(stats, LAYER_STATS)
    layer_verdicts = (_layer_verdicts(a["dead_fraction"], a["saturation_fraction"], th)
                      if len(layer_steps) and len(layer_names) else
                      _empty((len(layer_steps), len(layer_names))))
    layers = Grid("layer", layer_steps, layer_names, *layer_verdicts)

    global_steps, global_names, g = _axis(stats, (GLOBAL_STAT,), scalar=True)
    global_verdicts = (_global_verdicts(g[GLOBAL_STAT], th) if len(global_steps)
                       else _empty((0, 1)))
    global_norm = Grid("global", global_steps, (GLOBAL_STAT,), *global_verdicts)
    return Classification(variables, layers, global_norm, updates, th)


def _history(norm, top, window):
    """`previous_min` and `windows` for `_variable_verdicts` over a whole run."""
    if norm is None:
        return np.float32(np.inf), lambda rows, cols: (
            np.full((len(rows), window), np.nan, np.float32),) * 2

    def windows(rows, cols):
        index = rows[:, None] + np.arange(-window, 0)
        before_start, index = index < 0, np.maximum(index, 0)
        records = np.where(before_start, np.nan, norm[index, cols[:, None]])
        return records, np.where(before_start, np.nan, top[index])

    return _previous_min(norm, window), windows


def _empty(shape):
    return (np.zeros(shape, np.int8), np.zeros(shape, np.int8),
            np.full(shape, np.nan, np.float32))


# ---------------------------------------------------------------------------
# Episodes.


KIND_TITLES = {
    "nonfinite": "Non-finite gradients",
    "exploding": "Exploding gradients",
    "vanishing": "Vanishing gradients",
    "dead": "Dead units",
    "saturated": "Saturated activations",
    "stalled": "Stalled updates",
}


def _episode(kind, scope, names, first_step, last_step, worst, th):
    """Builds an Episode; `worst` maps rule id to the worst figure seen."""
    rule_id = min(worst)
    rule = _RULES[rule_id]
    threshold = float(getattr(th, rule.threshold)) if rule.threshold else 0.0
    figure = float(worst[rule_id])
    if scope == "global":
        where = "the global gradient norm"
    elif len(names) == 1:
        where = names[0]
    else:
        where = f"{names[0]} ... {names[-1]} ({len(names)} {scope}s)"
    when = (f"step {first_step}" if first_step == last_step
            else f"steps {first_step}-{last_step}")
    if np.isnan(figure):  # a non-finite norm without a `grad_nonfinite` count
        text = "the gradient norm is not finite"
    else:
        text = rule.text.format(f=figure, t=threshold)
    message = f"{KIND_TITLES[kind]} in {where}, {when}: {text}."
    return Episode(kind, scope, tuple(names), int(first_step), int(last_step), rule.name,
                   figure, threshold, message)


def _sort_key(episode):
    return episode.first_step, KINDS.index(episode.kind), SCOPES.index(episode.scope)


def _grid_episodes(grid, rules, th):
    episodes = []
    for kind, (low, high) in _KIND_IDS.items():
        mask = (rules >= low) & (rules <= high)
        rows = np.flatnonzero(mask.any(axis=1))
        if not rows.size:
            continue
        for run in np.split(rows, np.flatnonzero(np.diff(rows) > th.merge_gap + 1) + 1):
            start, stop = run[0], run[-1] + 1
            cells, kinds = mask[start:stop], rules[start:stop]
            figures = grid.figures[start:stop]
            worst = {}
            for i in range(low, high + 1):
                hits = kinds == i
                if hits.any():
                    worst[i] = _RULES[i].worst.reduce(figures[hits])
            names = [grid.names[i] for i in np.flatnonzero(cells.any(axis=0))]
            episodes.append(_episode(kind, grid.scope, names, grid.steps[start],
                                     grid.steps[run[-1]], worst, th))
    return episodes


def find_episodes(classification):
    """Groups a classification's findings into episodes.

    Findings of one kind on one axis (variables, layers, the global norm)
    form one episode while they recur within `Thresholds.merge_gap` records
    of each other, whichever names they concern. A global finding that a
    variable of the same class explains at the same step is left out.

    Args:
        classification: What `classify` returned.

    Returns:
        A list of `Episode`, by first step and then kind, most serious first.

    Example:

    >>> result = classify({"grad_norm": ([0, 1], ["a", "b"], [[1e-6, 1.0], [1e-6, 1.0]])})
    >>> [(e.kind, e.names, e.first_step, e.last_step) for e in find_episodes(result)]
    [('vanishing', ('a',), 0, 1)]
    """
    c, th = classification, classification.thresholds
    episodes = []
    for grid in (c.variables, c.updates, c.layers):
        episodes += _grid_episodes(grid, grid.rules, th)
    g = c.global_norm
    if len(g.steps):
        codes = np.zeros((len(g.steps), max(len(c.names), 1)), np.int8)
        row = np.searchsorted(c.steps, g.steps)
        same = row < len(c.steps)
        same[same] = c.steps[row[same]] == g.steps[same]
        if len(c.names):
            codes[same] = c.codes[row[same]]
        episodes += _grid_episodes(g, _unexplained(g.rules, codes), th)
    return sorted(episodes, key=_sort_key)


class _Open:
    """An episode still growing in a StreamingDetector."""

    def __init__(self, step, row):
        self.first_step = step
        self.last_step, self.last_row = step, row
        self.names = {}  # name -> model position
        self.worst = {}  # rule id -> worst figure


def _grow(episode, cells, worst, i, names):
    """Adds findings to an `_Open` episode.

    Args:
        episode: The `_Open`.
        cells: bool `[N]`, the names with a finding.
        worst: A dict from rule id to `(fired, figures)`, whose item `i` says
            whether the rule fired and the worst figure it measured.
        i: The item of `worst` to add.
        names: The `N` names.
    """
    for column in np.flatnonzero(cells):
        episode.names.setdefault(names[column], int(column))
    for rule_id, (fired, figures) in worst.items():
        if fired[i]:
            previous = episode.worst.get(rule_id, np.nan)
            episode.worst[rule_id] = _RULES[rule_id].worst(previous, figures[i])


class StreamingDetector:
    """Applies the rules as records arrive, for a training callback.

    `observe` takes one recorded step, `observe_many` a batch of them; the
    two give the same episodes however the records are split, and a batch
    costs about as much as one step. It keeps only the last
    `baseline_window` grad norms of each variable and the episodes it has
    seen, so its memory does not grow with training.

    Args:
        thresholds: A `Thresholds`. Defaults to `Thresholds()`.

    Example:

    >>> detector = StreamingDetector()
    >>> names = {"grad_norm": ["a/kernel", "b/kernel"]}
    >>> started = detector.observe(0, {"grad_norm": [1e-7, 1.0]}, names)
    >>> started[0].kind, started[0].names, started[0].first_step
    ('vanishing', ('a/kernel',), 0)
    >>> detector.observe(1, {"grad_norm": [1e-7, 1.0]}, names)  # the same episode
    []
    """

    def __init__(self, thresholds=None):
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(
                f"`thresholds` must be a Thresholds. Received: thresholds={thresholds!r}")
        self.reset()

    def reset(self):
        """Forgets everything seen, e.g. at the start of a new `fit`."""
        self._names = ()
        self._history = np.zeros((0, self.thresholds.baseline_window), np.float32)
        self._tops = np.full(self.thresholds.baseline_window, np.nan, np.float32)
        self._slot = 0
        self._rows = {scope: -1 for scope in SCOPES}
        self._open = {}
        self._closed = []

    def observe(self, step, values, names):
        """Judges one recorded step.

        The same as `observe_many` on a batch of one step.

        Args:
            step: The step, as recorded.
            values: A dict from statistic name to a 1-D array over variables
                or layers, or a float for `global_grad_norm`. Statistics not
                recorded at this step are simply left out.
            names: A dict from statistic name to its list of variable or
                layer names, in model order.

        Returns:
            The list of `Episode`s that start at this step (empty if none).
            Each is a snapshot; `episodes()` has their later extent.
        """
        return self.observe_many([step], values, names)

    def observe_many(self, steps, values, names):
        """Judges a batch of recorded steps at once.

        Returns what calling `observe` on each step in order would have
        returned, one list after the other, and leaves the detector as those
        calls would have left it. The rules run once on the whole batch, so
        the cost hardly grows with its length: read records back in batches
        and pass them here.

        Args:
            steps: The `T` recorded steps, increasing.
            values: A dict from statistic name to an array `[T, N]` over
                variables or layers, or `[T]` for `global_grad_norm`.
                Statistics not recorded in this batch are simply left out;
                one that is present covers all `T` steps.
            names: A dict from statistic name to its list of `N` variable or
                layer names, in model order.

        Returns:
            The list of `Episode`s that start within the batch, by first step
            and then kind (empty if none). Each is a snapshot taken at its
            first step; `episodes()` has their later extent.

        Example:

        >>> detector = StreamingDetector()
        >>> names = {"grad_norm": ["a/kernel", "b/kernel"]}
        >>> norms = [[1e-7, 1.0], [1e-7, 1.0], [1.0, 1.0]]
        >>> started = detector.observe_many([0, 1, 2], {"grad_norm": norms}, names)
        >>> [(e.kind, e.names, e.first_step, e.last_step) for e in started]
        [('vanishing', ('a/kernel',), 0, 0)]
        >>> detector.episodes()[0].last_step  # the same episode grew over step 1
        1
        """
        th = self.thresholds
        steps = np.asarray(steps, np.int64).reshape(-1)
        T = len(steps)
        started, codes = [], None
        if not T:
            return started
        if any(s in values for s in VARIABLE_STATS):
            var_names, rows = self._align(values, names, VARIABLE_STATS, T)
            self._resize(var_names)
            norm, count, update = (rows[s] for s in VARIABLE_STATS)
            codes, rules, figures = self._judge_variables(norm, count, update, T)
            first = self._advance("variable", T)
            started += self._add("variable", first, steps, rules, figures, var_names)
            if update is not None:
                _, rules, figures = _update_verdicts(update, var_names, th)
                started += self._add("variable", first, steps, rules, figures, var_names)
        if any(s in values for s in LAYER_STATS):
            layer_names, rows = self._align(values, names, LAYER_STATS, T)
            _, rules, figures = _layer_verdicts(rows["dead_fraction"],
                                                rows["saturation_fraction"], th)
            started += self._add("layer", self._advance("layer", T), steps, rules, figures,
                                 layer_names)
        if values.get(GLOBAL_STAT) is not None:
            norm = np.asarray(values[GLOBAL_STAT], np.float32).reshape(T, 1)
            _, rules, figures = _global_verdicts(norm, th)
            if codes is not None:
                rules = _unexplained(rules, codes)
            started += self._add("global", self._advance("global", T), steps, rules, figures,
                                 (GLOBAL_STAT,))
        return sorted(started, key=_sort_key)

    def episodes(self):
        """Returns every episode seen so far, as `find_episodes` would list them."""
        everything = self._closed + list(self._open.items())
        return sorted((self._freeze(key, ep) for key, ep in everything), key=_sort_key)

    def summary(self, max_lines=20):
        """Returns a short text of the episodes seen, or "" if there were none.

        Args:
            max_lines: Episodes listed before the rest are counted. Defaults
                to `20`.
        """
        episodes = self.episodes()
        if not episodes:
            return ""
        lines = [f"keras-vg found {len(episodes)} gradient-health episode(s):"]
        lines += [f"  - {e.message}" for e in episodes[:max_lines]]
        if len(episodes) > max_lines:
            lines.append(f"  ... and {len(episodes) - max_lines} more.")
        return "\n".join(lines)

    def _align(self, values, names, wanted, T):
        """Aligns the `wanted` statistics present onto one list of names, `[T, N]` each."""
        present = [s for s in wanted if s in values]
        axis = _merge_names([list(names[s]) for s in present])
        rows = {}
        for stat in wanted:
            if stat not in values:
                rows[stat] = None
                continue
            stat_names = list(names[stat])
            row = np.asarray(values[stat], np.float32).reshape(T, len(stat_names))
            if stat_names != axis:
                index = {name: i for i, name in enumerate(axis)}
                full = np.full((T, len(axis)), np.nan, np.float32)
                full[:, [index[n] for n in stat_names]] = row
                row = full
            rows[stat] = row
        return tuple(axis), rows

    def _resize(self, names):
        """Keeps the history of variables that remain when the model changes."""
        if names == self._names:
            return
        old = {name: i for i, name in enumerate(self._names)}
        history = np.full((len(names), self.thresholds.baseline_window), np.nan, np.float32)
        for i, name in enumerate(names):
            if name in old:
                history[i] = self._history[old[name]]
        self._names, self._history = names, history

    def _judge_variables(self, norm, count, update, T):
        """`_variable_verdicts` on `T` rows after the kept history, which they then join.

        The kept records, oldest first, followed by the batch form a run that
        `classify`'s own `_history` serves, so each row sees exactly the
        previous `baseline_window` records, kept or in the batch.
        """
        window, n = self.thresholds.baseline_window, len(self._names)
        if norm is None:
            top = np.full(T, np.nan, np.float32)
            kept = np.full((T, n), np.nan, np.float32)
        else:
            top, kept = _top(norm), norm
        if n:
            order = (self._slot + np.arange(window)) % window
            previous_min, windows = _history(np.concatenate([self._history[:, order].T, kept]),
                                             np.concatenate([self._tops[order], top]), window)
            verdicts = _variable_verdicts(norm, count, update, top, previous_min[window:],
                                          lambda r, c: windows(r + window, c), self.thresholds)
        else:
            verdicts = _empty((T, 0))
        last = min(T, window)
        slots = (self._slot + np.arange(T - last, T)) % window
        self._history[:, slots] = kept[T - last:].T
        self._tops[slots] = top[T - last:]
        self._slot = (self._slot + T) % window
        return verdicts

    def _advance(self, scope, count):
        """Counts `count` more records of `scope`; returns the index of the first."""
        self._rows[scope] += count
        return self._rows[scope] - count + 1

    def _add(self, scope, first_row, steps, rules, figures, names):
        """Grows or opens the episodes of `scope` with rows of verdicts `[T, N]`.

        Row `i` is record `first_row + i` of the scope, at `steps[i]`. Returns
        the episodes opened, each frozen as it stood after its first row.
        """
        started = []
        if not rules.any():
            return started
        counts = np.bincount(rules.reshape(-1), minlength=len(_RULES))
        gap = self.thresholds.merge_gap + 1
        for kind, (low, high) in _KIND_IDS.items():
            ids = [i for i in range(low, high + 1) if counts[i]]
            if not ids:
                continue
            mask = (rules >= low) & (rules <= high)
            hit_rows = np.flatnonzero(mask.any(axis=1))
            mask, kinds, figs = mask[hit_rows], rules[hit_rows], figures[hit_rows]
            rows = first_row + hit_rows
            # Runs of rows with hits, each within merge_gap records of the last.
            starts = np.concatenate(([0], np.flatnonzero(np.diff(rows) > gap) + 1))
            ends = np.append(starts[1:], len(rows)) - 1
            # Each rule's worst figure and whether it fired, per row and per run.
            row_worst, run_worst = {}, {}
            for i in ids:
                hits, worst = kinds == i, _RULES[i].worst
                fired = hits.any(axis=1)
                figure = worst.reduce(np.where(hits, figs, np.float32(np.nan)), axis=1)
                row_worst[i] = fired, figure
                run_worst[i] = np.logical_or.reduceat(fired, starts), worst.reduceat(figure, starts)
            run_cells = np.logical_or.reduceat(mask, starts, axis=0)
            key = (scope, kind)
            episode = self._open.get(key)
            for run, (start, end) in enumerate(zip(starts, ends, strict=True)):
                if episode is None or rows[start] - episode.last_row > gap:
                    if episode is not None:
                        self._closed.append((key, episode))
                    episode = _Open(int(steps[hit_rows[start]]), int(rows[start]))
                    _grow(episode, mask[start], row_worst, start, names)
                    started.append(self._freeze(key, episode))
                episode.last_step, episode.last_row = int(steps[hit_rows[end]]), int(rows[end])
                _grow(episode, run_cells[run], run_worst, run, names)
            self._open[key] = episode
        return started

    def _freeze(self, key, episode):
        scope, kind = key
        names = sorted(episode.names, key=episode.names.get)
        return _episode(kind, scope, names, episode.first_step, episode.last_step,
                        episode.worst, self.thresholds)
