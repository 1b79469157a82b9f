"""The rules applied to rows of records: the kernels that `classify` and `StreamingDetector` share.

Each `_*_verdicts` function takes rows `[R, N]` of one axis' statistics and
returns `(codes, rules, figures)`, each `[R, N]`: a class code, the rule
behind it (an id of `rules.RULE_NAMES`) and what the rule measured. A whole
run and a batch of streamed records go through the same functions, so they
agree; what the spike rule knows of earlier records is a `_History`, built
over a whole run (`_history`) or over the kept records and a batch.

The names are private to `keras_vg.detect`: its modules import them, nothing
else should.
"""

from typing import NamedTuple

import numpy as np

from keras_vg.detect.rules import _CODE_OF_RULE, _ID, VARIABLE_STATS


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


class _History(NamedTuple):
    """What the spike rule knows of each cell's past (`_history` builds it).

    Attributes:
        previous_min: float32 `[R, U]`, the smallest grad norm among each
            cell's previous `baseline_window` records (inf or NaN if none).
        floor: `floor(rows, cols) -> [K]`, the largest such window minimum
            up to each of those cells: the level its gradient has held for a
            whole window (NaN if none yet). A function, like `windows`,
            since only spike candidates need it.
        windows: `windows(rows, cols) -> (records, tops)`, the previous
            records `[K, W]` of those cells and the `top` of their steps.
    """

    previous_min: np.ndarray
    floor: np.ndarray
    windows: object


def _floor(previous_min, carried=None):
    """`_History.floor` for rows of window minima `[R, U]` that follow a running maximum `carried` `[U]`.

    The running maximum is taken down the columns that hold a candidate only.
    """
    def floor(rows, cols):
        columns, where = np.unique(cols, return_inverse=True)
        x = previous_min[:, columns]
        x = np.where(np.isfinite(x), x, np.nan)
        if carried is not None:
            x = np.concatenate([carried[None, columns], x])
        with np.errstate(invalid="ignore"):
            running = np.fmax.accumulate(x, axis=0) if x.size else x
        return running[rows + (carried is not None), where]

    return floor


def _floor_after(previous_min, carried):
    """The running maximum `[U]` after rows of window minima `[R, U]`, from `carried`."""
    with np.errstate(invalid="ignore"):
        last = np.fmax.reduce(np.where(np.isfinite(previous_min), previous_min, np.nan), axis=0, initial=-np.inf)
    return np.fmax(carried, np.where(last == -np.inf, np.nan, last)).astype(np.float32)


def _history(norm, top, window):
    """The `_History` of a whole run's grad norms `[T, U]` for `_unit_verdicts`."""
    if norm is None or not norm.shape[1]:
        return _History(np.float32(np.inf), lambda rows, cols: np.full(len(rows), np.nan, np.float32),
                        lambda rows, cols: (np.full((len(rows), window), np.nan, np.float32),) * 2)

    def windows(rows, cols):
        index = rows[:, None] + np.arange(-window, 0)
        before_start, index = index < 0, np.maximum(index, 0)
        records = np.where(before_start, np.nan, norm[index, cols[:, None]])
        return records, np.where(before_start, np.nan, top[index])

    previous_min = _previous_min(norm, window)
    return _History(previous_min, _floor(previous_min), windows)


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


def _unit_verdicts(norm, update, top, history, th):
    """Applies the per-layer gradient rules to rows of units.

    Args:
        norm, update: float32 `[R, U]` units' grad norm and update ratio;
            NaN where not recorded, None where the statistic is absent.
        top: float32 `[R]`, `_top(norm)`.
        history: A `_History` of the units' grad norms.
        th: `Thresholds`.

    Returns:
        `(codes, rules, figures)`, each `[R, U]`.
    """
    shape = next(a.shape for a in (norm, update) if a is not None)
    out = _Verdicts(shape)
    if not shape[1]:
        return out.result()
    if norm is None:
        norm = np.broadcast_to(np.float32(np.nan), shape)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # A baseline is needed only where a spike is possible (a window's
        # median is at least its minimum) or where a large update awaits the
        # warm-up check: this keeps the medians off almost every cell.
        maybe_spike = norm > th.spike_factor * history.previous_min
        big_update = None
        if update is not None and th.exploding_update_ratio is not None:
            big_update = update > th.exploding_update_ratio
        rows, cols = _nonzero(maybe_spike if big_update is None else maybe_spike | big_update)
        median, count = _baseline(*history.windows(rows, cols), th)
        warm = count >= th.min_history
        # The level to beat: the recent median, but never below a level the layer held for a
        # whole window before. A converged layer whose gradient shrank 100x is not exploding
        # when one hard batch brings it back towards its old size.
        median = np.fmax(median, history.floor(rows, cols))
        value = norm[rows, cols]
        spike = (maybe_spike[rows, cols] & warm & (median > 0)
                 & (value > th.spike_factor * median)
                 # a jump in a gradient that is still negligible is no explosion
                 & ~(value < th.vanishing_ratio * top[rows]))
        big_update = warm & (False if big_update is None else big_update[rows, cols])
        big_norm = np.broadcast_to(False, shape)
        if th.exploding_norm is not None:
            big_norm = norm > th.exploding_norm

        # Only cells below `vanishing_ratio` of their step's largest can be below that of the layers
        # above them: the reference is computed on their rows alone. An exploding layer must not make
        # all the others look vanishing, so it is left out of the reference.
        low = np.flatnonzero((norm < th.vanishing_ratio * top[:, None]).any(axis=1))
        exploding = np.zeros((len(low), shape[1]), bool)
        if th.exploding_norm is not None:
            exploding |= norm[low] > th.exploding_norm
        sparse = (spike | big_update) & np.isin(rows, low)
        exploding[np.searchsorted(low, rows[sparse]), cols[sparse]] = True
        reference = _above(np.where(exploding | ~np.isfinite(norm[low]), np.nan, norm[low]))
        vanishing = norm[low] < th.vanishing_ratio * reference
        r, c = _nonzero(vanishing)
        out.put("vanishing", (low[r], c), norm[low[r], c] / reference[r, c])
        out.put("update_ratio", (rows[big_update], cols[big_update]), lambda i: update[i])
        out.put("grad_norm", big_norm, lambda i: norm[i])
        out.put("spike", (rows[spike], cols[spike]), value[spike] / median[spike])
    return out.result()


def _nonfinite_verdicts(verdicts, norm, count):
    """Marks each variable's own non-finite gradient over the broadcast verdicts `[R, N]`.

    With `grad_nonfinite`, a count above 0 is the evidence; without it, a
    NaN or inf norm (with the count recorded and 0, an infinite norm is a
    float32 overflow of finite values: exploding, which the layer rules
    judge).
    """
    out = _Verdicts.of(*verdicts)
    if count is not None:
        out.put("nonfinite", count > 0, lambda i: count[i])
    elif norm is not None:
        out.put("nonfinite", ~np.isfinite(norm))
    return out.result()


def _finite_max(x):
    """Largest finite value of each row of `x` (NaN if none)."""
    return np.fmax.reduce(np.where(np.isfinite(x), x, np.nan), axis=1)


def _above(norm):
    """For each cell of `[R, U]`, the largest value among the layers after it in model order (NaN if none).

    Vanishing gradients shrink on their way back from the output: a layer is
    compared with the layers between it and the output, never with those
    below it. (Below BatchNormalization the lowest layers often have the
    largest gradients, and that is no vanishing.)
    """
    out = np.full(norm.shape, np.nan, np.float32)
    if norm.shape[1] > 1:
        out[:, :-1] = np.fmax.accumulate(norm[:, :0:-1], axis=1)[:, ::-1]
    return out


def _top(norm):
    """The largest finite grad norm of each row `[R, U]`: the vanishing reference."""
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


def _update_verdicts(update, skipped, th):
    """The "stalled" findings on rows of the units' update ratios `[R, U]`.

    Only kernels are judged (a young bias naturally moves far more, relative
    to its size, than a kernel). A row where no layer moved more than
    `resolution_ratio`, or where `keras_vg.AutoClip` skipped the step
    (`skipped` `[R]` > 0, None if not recorded), applied no update: that is
    a skipped step (loss scaling and AutoClip skip steps with non-finite
    gradients), not a stall.
    """
    out = _Verdicts(update.shape)
    res = th.resolution_ratio if th.resolution_ratio is not None else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        moving = (update > res).any(axis=1)
        if skipped is not None:
            moving &= ~(skipped > 0)
        half = update.shape[1] // 2
        if th.stalled_ratio is not None and half >= 2:  # a median of one layer is no baseline
            lower, upper = update[:, :half], update[:, half:]
            # median <= max, so rows failing this test cannot stall: skip their sort
            candidates = np.flatnonzero(
                moving & (np.fmin.reduce(lower, axis=1) < th.stalled_ratio * np.fmax.reduce(upper, axis=1)))
            median, _ = _nanmedian_rows(upper[candidates])
            relative = lower[candidates] / median[:, None]
            r, c = np.nonzero(relative < th.stalled_ratio)
            out.put("stalled", (candidates[r], c), relative[r, c])
        if th.resolution_ratio is not None:
            out.put("below_resolution", (update < res) & moving[:, None], lambda i: update[i])
    return out.result()


def _layer_verdicts(dead, saturation, guards, th):
    """The per-layer rules on rows `[R, L]` (None where a statistic is absent).

    `guards` is `Structure.layer_guards`' `(may_die, may_saturate)` `[L]`.
    """
    out = _Verdicts(next(a.shape for a in (dead, saturation) if a is not None))
    may_die, may_saturate = guards
    with np.errstate(invalid="ignore"):
        if saturation is not None:
            out.put("saturated", (saturation >= th.saturation_fraction) & may_saturate,
                    lambda i: saturation[i])
        if dead is not None:
            out.put("dead", (dead >= th.dead_fraction) & may_die, lambda i: dead[i])
    return out.result()


def _global_verdicts(norm, th):
    """The global grad norm's rules on `[R, 1]`."""
    out = _Verdicts(norm.shape)
    if th.exploding_norm is not None:
        with np.errstate(invalid="ignore"):
            out.put("grad_norm", norm > th.exploding_norm, lambda i: norm[i])
    out.put("nonfinite", ~np.isfinite(norm))
    return out.result()


def _skipped_verdicts(skipped):
    """The steps AutoClip skipped, on `[R, 1]`: the count as figure."""
    out = _Verdicts(skipped.shape)
    with np.errstate(invalid="ignore"):
        out.put("skipped", skipped > 0, lambda i: skipped[i])
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

    @classmethod
    def of(cls, codes, rules, figures):
        out = cls.__new__(cls)
        out.codes, out.rules, out.figures = codes, rules, figures
        return out

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


def _empty(shape):
    return (np.zeros(shape, np.int8), np.zeros(shape, np.int8),
            np.full(shape, np.nan, np.float32))


def _judge_variables(structure, rows, top, history, th):
    """The variable grid's and the updates grid's verdicts on rows `[R, N]`.

    Args:
        structure: The variables' `Structure`.
        rows: `{stat: [R, N] or None}` for `VARIABLE_STATS`, plus the units'
            grad norms under `"units"` and `skipped` `[R]` (or None).
        top, history: As `_unit_verdicts` takes them, for the units' grad
            norms.
        th: `Thresholds`.

    Returns:
        `(variable verdicts, update verdicts)`, each `(codes, rules, figures)` `[R, N]`.
    """
    norm, count, update = rows["grad_norm"], rows["grad_nonfinite"], rows["update_ratio"]
    shape = next(rows[s].shape for s in VARIABLE_STATS if rows[s] is not None)
    units = rows["units"]
    unit_update = structure.unit_updates(update, rows["weight_norm"]) if update is not None else None
    if units is None and unit_update is None:
        unit_verdicts = _empty((shape[0], len(structure.units)))
    else:
        unit_verdicts = _unit_verdicts(units, unit_update, top, history, th)
    verdicts = _nonfinite_verdicts(structure.broadcast(unit_verdicts, shape), norm, count)
    if unit_update is not None:
        updates = structure.broadcast(_update_verdicts(unit_update, rows["skipped"], th), shape)
    else:
        updates = _empty(shape)
    return verdicts, updates
