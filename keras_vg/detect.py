"""Region rules: where and when gradients vanish, explode, go non-finite or die.

This is the one place that decides what is unhealthy. The `GradientMonitor`
callback (through `StreamingDetector`), the report and CLI and the TensorBoard
plugin (through `classify` and `find_episodes`) all call it, so they always
agree. It imports numpy and the standard library only.

The gradient rules judge **layers along the network's depth**, and a layer's
kernels carry its verdict: a layer's gradient norm is the root of the sum of
squares of its kernels' norms (variables of rank 2 or more: `kernel`,
`recurrent_kernel`, `embeddings`, ...), and the verdict is then given to all
of the layer's variables. Biases, normalisation scales and offsets inform
(their non-finite values count) but never decide alone, and variables whose
gradient is zero by construction (a bias before BatchNormalization,
attention's key bias; see `Structure`) get no verdict at all. The model
summary that `GradientMonitor` writes says which layer each variable belongs
to and its role; without one, a variable's layer is its path's parent and
its role follows its name (`variable_role`).

Every cell (a variable or a layer at a recorded step) gets a class:

| code | name        | when (the numbers are `Thresholds` fields)                        |
|------|-------------|-------------------------------------------------------------------|
| 0    | `healthy`   | none of the below                                                 |
| 1    | `vanishing` | its layer's grad norm < `vanishing_ratio` x the largest among the |
|      |             | layers above it (nearer the output) at the same step              |
| 2    | `exploding` | its layer's grad norm > `spike_factor` x its usual level (the     |
|      |             | median of its previous records, never below a level it held for a |
|      |             | whole window), or > `exploding_norm`; or its layer's kernels'     |
|      |             | update ratio > `exploding_update_ratio`                           |
| 3    | `nonfinite` | NaN/inf in the variable's gradient                                |
| 4    | `dead`      | a layer's `dead_fraction` >= `dead_fraction`                       |
| 5    | `saturated` | a hidden layer's `saturation_fraction` >= `saturation_fraction`    |

Where several hold, the more serious wins: nonfinite > exploding > vanishing,
and dead > saturated. Beside the classes, "stalled" findings mark layers whose
applied update is negligible (below float32 resolution, or far below the
upper half of the network), and "skipped" ones the steps `keras_vg.AutoClip`
skipped. Findings become episodes only when they persist (`min_records`)
or are extreme (non-finite, or `extreme_factor` beyond their threshold).
`docs/DETECTION.md` gives the sources of every default.

Example:

>>> from keras_vg.reader import read_run                   # doctest: +SKIP
>>> result = classify(read_run("logs/run1"))                # doctest: +SKIP
>>> for episode in find_episodes(result):                   # doctest: +SKIP
...     print(episode.message)
"""

import dataclasses
import numbers
from typing import NamedTuple

import numpy as np

from keras_vg.activations import NEVER_DEAD

HEALTHY, VANISHING, EXPLODING, NONFINITE, DEAD, SATURATED = range(6)
CLASS_NAMES = ("healthy", "vanishing", "exploding", "nonfinite", "dead", "saturated")
"""Cell class names, indexed by code."""

KINDS = ("nonfinite", "exploding", "vanishing", "dead", "saturated", "stalled", "skipped")
"""Episode kinds, most serious first."""

SCOPES = ("variable", "layer", "global")

VARIABLE_STATS = ("grad_norm", "grad_nonfinite", "update_ratio", "weight_norm")
LAYER_STATS = ("dead_fraction", "saturation_fraction")
GLOBAL_STAT = "global_grad_norm"
SKIPPED_STAT = "skipped"

ROLES = ("kernel", "bias", "scale", "offset", "vector")
"""Variable roles (`variable_role`); only kernels carry a layer's verdict."""



class _Rule(NamedTuple):
    name: str
    kind: str
    code: int
    worst: np.ufunc  # reduces an episode's figures to the worst one (the total for `skipped`)
    threshold: str  # the `Thresholds` field the figure is compared with
    text: str  # describes the worst figure `f` against the threshold `t`


# A rule's id is its index here. Ids are in precedence order, so the lowest id
# that fires on a cell wins it, and each kind's ids are contiguous.
_RULES = (
    None,
    _Rule("nonfinite", "nonfinite", NONFINITE, np.fmax, "",
          "up to {f:.0f} NaN/inf values in one gradient"),
    _Rule("spike", "exploding", EXPLODING, np.fmax, "spike_factor",
          "gradient norm up to {f:.3g}x its usual level (threshold {t:g}x)"),
    _Rule("grad_norm", "exploding", EXPLODING, np.fmax, "exploding_norm",
          "gradient norm up to {f:.3g} (threshold {t:g})"),
    _Rule("update_ratio", "exploding", EXPLODING, np.fmax, "exploding_update_ratio",
          "one update changed the kernels by up to {f:.3g}x their norm (threshold {t:g})"),
    _Rule("vanishing", "vanishing", VANISHING, np.fmin, "vanishing_ratio",
          "gradient norm down to {f:.2g} of the largest among the layers above (threshold {t:g})"),
    _Rule("dead", "dead", DEAD, np.fmax, "dead_fraction",
          "up to {f:.0%} of units passed no gradient for a whole batch (threshold {t:.0%})"),
    _Rule("saturated", "saturated", SATURATED, np.fmax, "saturation_fraction",
          "up to {f:.0%} of activations at an asymptote (threshold {t:.0%})"),
    _Rule("below_resolution", "stalled", HEALTHY, np.fmin, "resolution_ratio",
          "update ratio down to {f:.2g}, below float32 resolution ({t:.2g}): "
          "these kernels are not changing"),
    _Rule("stalled", "stalled", HEALTHY, np.fmin, "stalled_ratio",
          "update ratio down to {f:.2g} of the upper half's median (threshold {t:g}): "
          "these kernels barely change"),
    _Rule("skipped", "skipped", HEALTHY, np.add, "",
          "{f:.0f} steps with a non-finite gradient were not applied"),
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
# Findings that make an episode on one record: a non-finite gradient, a skipped step.
_ALWAYS_EXTREME = frozenset({_ID["nonfinite"], _ID["skipped"]})
# Findings that do when `extreme_factor` beyond their threshold; the others need persistence.
_EXTREME_WHEN_LARGE = frozenset({_ID["spike"], _ID["grad_norm"], _ID["update_ratio"]})


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
        vanishing_ratio: A layer vanishes at a step where its kernels' grad
            norm is below this fraction of the largest layer's at that step
            (AUTOTRAINER's first/last-layer ratio). Defaults to `1e-3`.
        spike_factor: A layer explodes where its grad norm exceeds this
            multiple of the median of its own previous records. Defaults
            to `10`.
        baseline_window: How many previous records that median spans.
            Defaults to `20`.
        min_history: Usable records (finite, and not vanishing at their own
            step) needed in the window before the spike and update-ratio
            rules judge a layer. Defaults to `5`.
        exploding_norm: A layer's or the global grad norm above this
            explodes whatever its history; None turns the rule off.
            Defaults to `1e3`.
        exploding_update_ratio: A layer explodes where one step changed its
            kernels by more than this multiple of their norm; None turns the
            rule off. Defaults to `1.0`.
        dead_fraction: A layer is dead where at least this fraction of its
            units passed no gradient for every sample of the record step's
            batch. Defaults to `0.7`.
        saturation_fraction: A hidden layer is saturated where at least
            this fraction of its activations sat at an asymptote. Defaults
            to `0.5`.
        stalled_ratio: A layer is stalled where its kernels' update ratio
            is below this fraction of the median of the upper half of the
            layers, and it lies in the lower half; None turns the rule off.
            Defaults to `1e-2`.
        resolution_ratio: A layer is stalled where its kernels' update
            ratio is below this (float32's machine epsilon: the update is
            lost to rounding); None turns the rule off. Defaults to `2**-23`.
        merge_gap: Records without a finding that may separate two findings
            of the same kind within one episode. Defaults to `5`.
        min_records: Records at which one name (a layer, or the global
            norm) must have a finding before the findings of its kind make
            an episode, unless one of them is extreme. Defaults to `2`.
        extreme_factor: A non-finite gradient or a skipped step is extreme;
            so is an exploding figure at least this multiple of its
            threshold (a spike of 100x the median by default). One extreme
            record makes an episode. Defaults to `10`.
        structural_ratio: A bias, scale or offset whose grad norm stays
            below this fraction of its layer's kernels' at every record has
            a zero gradient by construction (`zero_gradients`), where the
            model summary does not know the layer's graph. Defaults to
            `1e-4`.

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
    dead_fraction: float = 0.7
    saturation_fraction: float = 0.5
    stalled_ratio: float | None = 1e-2
    resolution_ratio: float | None = 2.0**-23
    merge_gap: int = 5
    min_records: int = 2
    extreme_factor: float = 10.0
    structural_ratio: float = 1e-4

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
        _check(self, "min_records", lambda v: v >= 1, "an integer >= 1", integer=True)
        _check(self, "extreme_factor", lambda v: 1 <= v < np.inf, "a finite number >= 1")
        _check(self, "structural_ratio", lambda v: 0 < v < 1, "in (0, 1)")
        if (isinstance(self.min_history, bool) or not isinstance(self.min_history, numbers.Integral)
                or not 1 <= self.min_history <= self.baseline_window):
            raise ValueError(
                "`min_history` must be an integer in [1, baseline_window]. Received: "
                f"min_history={self.min_history!r}, baseline_window={self.baseline_window!r}"
            )


# ---------------------------------------------------------------------------
# Structure: which layer each variable belongs to, and which variables decide.


def variable_role(path, rank=None):
    """The role of a variable in its layer, from its name and, where known, its rank.

    Args:
        path: The variable's path (`dense/kernel`) or name.
        rank: The number of its dimensions, or None if unknown. Defaults to
            `None`.

    Returns:
        `"bias"`, `"scale"` (a normalisation's gamma), `"offset"` (its
        beta), `"kernel"` (a weight matrix or tensor: rank 2 or more, or any
        other name where the rank is unknown) or `"vector"` (another
        variable of rank 0 or 1, e.g. PReLU's alpha).

    Example:

    >>> variable_role("dense/kernel"), variable_role("bn/beta"), variable_role("mha/key/bias", 2)
    ('kernel', 'offset', 'bias')
    """
    name = str(path).rsplit("/", 1)[-1]
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    if name in ("gamma", "scale"):
        return "scale"
    if name in ("beta", "offset"):
        return "offset"
    if name == "alpha" or (rank is not None and rank < 2):
        return "vector"
    return "kernel"


def _parent(path):
    """A variable's layer where no summary says: its path's parent (`model/dense/kernel` -> `model/dense`)."""
    return str(path).rsplit("/", 1)[0]


class Structure:
    """How the variables make layers: the unit of judgement of the gradient rules.

    A *unit* is a layer with at least one kernel whose gradient is not zero by
    construction. Its grad norm is the root of the sum of squares of those
    kernels' norms; its update ratio ‖Δw‖/‖w‖ is taken over them together.
    Every variable of the layer (biases too) gets the unit's verdict, except
    structural zeros.

    Args:
        names: The variable paths, in model order.
        model: The model summary (`keras_vg.model_summary`), or None: then a
            variable's layer is its path's parent and its role follows its
            name. Defaults to `None`.

    Attributes:
        names: The variable paths.
        layers: Each variable's layer name.
        roles: Each variable's role (`ROLES`).
        units: The units' layer names, in model order.
        unit_of: int `[N]`, each variable's unit, or -1 (none, or a
            structural zero).
        structural: `{path: entry}` of the summary's `structural_zeros`.
        activations: `{layer: activation}` from the summary.
        outputs: The summary's output layers.
    """

    def __init__(self, names, model=None):
        self.names = tuple(names)
        model = model if isinstance(model, dict) else {}
        layer_of, role_of = {}, {}
        self.activations, self._inbound = {}, {}
        for entry in model.get("layers", []):
            self.activations[entry.get("name")] = entry.get("activation")
            self._inbound[entry.get("name")] = entry.get("inbound")
            roles = entry.get("roles") or [None] * len(entry.get("variables", []))
            for path, role in zip(entry.get("variables", []), roles):
                layer_of[path], role_of[path] = entry.get("name"), role
        self.structural = {z.get("variable"): z for z in model.get("structural_zeros", []) or []
                           if isinstance(z, dict)}
        self.outputs = frozenset(model.get("outputs", []) or [])
        self.layers = tuple(layer_of.get(n) or _parent(n) for n in self.names)
        self._layer_of = dict(zip(self.names, self.layers))
        self.roles = tuple(role_of.get(n) or variable_role(n) for n in self.names)
        judged = np.array([r == "kernel" and n not in self.structural
                           for n, r in zip(self.names, self.roles)], bool)
        self.units = tuple(dict.fromkeys(layer for layer, j in zip(self.layers, judged) if j))
        index = {layer: i for i, layer in enumerate(self.units)}
        self.unit_of = np.array([-1 if n in self.structural else index.get(layer, -1)
                                 for n, layer in zip(self.names, self.layers)], np.int64)
        # The kernels of each unit, contiguous: `reduceat` sums them in one pass.
        kernels = np.flatnonzero(judged)
        order = np.argsort(self.unit_of[kernels], kind="stable")
        self._kernels = kernels[order]
        self._starts = np.flatnonzero(np.diff(np.concatenate([[-1], self.unit_of[self._kernels]])))
        self._single = len(self._kernels) == len(self.units)  # one kernel per unit: its own values
        self._members = np.flatnonzero(self.unit_of >= 0)
        self._identity = np.array_equal(self.unit_of, np.arange(len(self.names)))

    def unit_norms(self, norm):
        """Each unit's grad norm `[T, U]` from the variables' `[T, N]`: root of the kernels' sum of squares."""
        if self._identity:  # every variable is a layer's only kernel
            return norm
        # Row-major, as the window minima's passes over rows want it (a column gather is not).
        x = np.take(norm, self._kernels, axis=1)
        if self._single or not x.shape[1]:
            return x
        with np.errstate(over="ignore", invalid="ignore"):
            return np.sqrt(np.add.reduceat(np.square(x.astype(np.float64)), self._starts, axis=1)
                           ).astype(np.float32)

    def unit_updates(self, update, weight):
        """Each unit's update ratio `[T, U]`: ‖Δw‖/‖w‖ over its kernels together.

        An undefined ratio (NaN: the weights' norm was 0) leaves that kernel
        out. Without `weight_norm`, the largest kernel ratio stands in.
        """
        if self._identity:
            return update
        r = np.take(update, self._kernels, axis=1)
        if self._single or not r.shape[1]:
            return r
        defined = ~np.isnan(r)
        with np.errstate(invalid="ignore", over="ignore"):
            if weight is None:
                return np.fmax.reduceat(r, self._starts, axis=1)
            w = np.where(defined, weight[:, self._kernels], 0.0).astype(np.float64)
            step = np.add.reduceat(np.square(np.where(defined, r, 0.0) * w), self._starts, axis=1)
            size = np.add.reduceat(np.square(w), self._starts, axis=1)
            ratio = np.sqrt(step) / np.sqrt(size)
        return np.where(size > 0, ratio, np.nan).astype(np.float32)

    def broadcast(self, verdicts, shape):
        """Gives each unit's verdict `[T, U]` to its variables: `(codes, rules, figures)` `[T, N]`."""
        if self._identity:  # every variable is a layer's only kernel: the verdicts are the variables'
            return verdicts
        out = _empty(shape)
        if not verdicts[1].any():
            return out
        if len(self._members):
            units = self.unit_of[self._members]
            for target, source in zip(out, verdicts):
                target[:, self._members] = source[:, units]
        return out

    def layer_guards(self, layer_names):
        """`(may_die, may_saturate)`, bool `[L]` for per-layer statistics' columns.

        A leaky ReLU or PReLU unit always passes gradient (never dead); an
        output layer's sigmoid or softmax saturates by design as a classifier
        grows confident (never saturated).
        """
        may_die = np.array([self.activations.get(n) not in NEVER_DEAD for n in layer_names], bool)
        may_saturate = np.array([n not in self.outputs for n in layer_names], bool)
        return may_die, may_saturate

    def graph_known(self, layer):
        """Whether the summary read this layer's place in the model's graph (its `inbound` layers)."""
        return self._inbound.get(layer) is not None

    def where(self, names):
        """Words for the layers of these variables: `dense_3`, or `dense ... dense_4 (5 layers)`."""
        layer_of = self._layer_of
        return _layer_words(list(dict.fromkeys(layer_of.get(n) or _parent(n) for n in names)))


def _layer_words(layers):
    """`layer dense_3`, or `layers dense ... dense_4 (5 layers)`."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {layers[0]} ... {layers[-1]} ({len(layers)} layers)"


# ---------------------------------------------------------------------------
# Grids and episodes.


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
            unknown, e.g. a non-finite norm without `grad_nonfinite`; the
            number of steps for `skipped`).
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
        names = (present[0],)
    else:
        names = tuple(_merge_names([list(e[1]) for e in entries.values()]))
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


# ---------------------------------------------------------------------------
# Episodes.


KIND_TITLES = {
    "nonfinite": "Non-finite gradients",
    "exploding": "Exploding gradients",
    "vanishing": "Vanishing gradients",
    "dead": "Dead units",
    "saturated": "Saturated activations",
    "stalled": "Stalled updates",
    "skipped": "Steps skipped by AutoClip",
}


def _episode(kind, scope, names, first_step, last_step, worst, th, where):
    """Builds an Episode; `worst` maps rule id to the worst figure seen, `where` words the names."""
    rule_id = min(worst)
    rule = _RULES[rule_id]
    threshold = float(getattr(th, rule.threshold)) if rule.threshold else 0.0
    figure = float(worst[rule_id])
    when = (f"step {first_step}" if first_step == last_step
            else f"steps {first_step}-{last_step}")
    place = f" in {where}" if where else ""
    message = f"{KIND_TITLES[kind]}{place}, {when}: {_measured(rule, figure, threshold)}."
    return Episode(kind, scope, tuple(names), int(first_step), int(last_step), rule.name,
                   figure, threshold, message)


def _measured(rule, figure, threshold):
    if np.isnan(figure):  # a non-finite norm without a `grad_nonfinite` count
        return "the gradient norm is not finite"
    return rule.text.format(f=figure, t=threshold)


def measured(episode):
    """What an episode measured, in words: its rule's figure against the threshold.

    The part of `Episode.message` after the place and the steps, built from
    the episode's `rule`, `figure` and `threshold`.

    Example:

    >>> result = classify({"grad_norm": ([0, 1], ["a", "b"], [[1e-6, 1.0], [1e-6, 1.0]])})
    >>> measured(find_episodes(result)[0])
    'gradient norm down to 1e-06 of the largest among the layers above (threshold 0.001)'
    """
    return _measured(_RULES[_ID[episode.rule]], episode.figure, episode.threshold)


def _where(scope, names, structure):
    if scope == "variable":
        return structure.where(names)
    if scope == "layer":
        return _layer_words(names)
    return "" if tuple(names) == (SKIPPED_STAT,) else "the global gradient norm"


def episode_order(episode):
    """The key episodes are listed by: first step, then the most serious kind, then scope."""
    return episode.first_step, KINDS.index(episode.kind), SCOPES.index(episode.scope)


class _Open:
    """An episode still growing: a candidate until it persists or turns extreme."""

    def __init__(self, step, row):
        self.first_step = step
        self.last_step, self.last_row = step, row
        self.names = {}  # name -> model position
        self.seen = (None, None)  # (the names of the last rows, bool [N]: those already in `names`)
        self.counts = {}  # name -> records with a finding
        self.worst = {}  # rule id -> worst figure
        self.reported = False


class _Episodes:
    """Groups rows of verdicts into episodes, for `find_episodes` and `StreamingDetector` alike.

    Findings of one kind on one scope form one episode while they recur
    within `merge_gap` records of each other, whichever names they concern.
    An episode is reported once one name has a finding at `min_records`
    records of it, or once a finding is extreme (`_extreme`); until then it
    is a candidate, which lapses silently. Feeding rows in any batches gives
    the same episodes.
    """

    def __init__(self, thresholds):
        self.th = thresholds
        self.open = {}  # (scope, kind) -> _Open
        self.closed = []  # (key, _Open, where) of reported episodes
        self.where = {}  # (scope, kind) -> the words for the names, as of the last rows

    def add(self, scope, first_row, steps, rules, figures, names, structure=None):
        """Adds rows `[R, N]` of verdicts; returns the episodes reported within them.

        Row `i` is record `first_row + i` of the scope, at `steps[i]`.
        Returns `(step, episode)` pairs: the step of the row where the episode
        was reported, and a snapshot of it as it stood there.
        """
        started = []
        if not rules.any():
            return started
        gap = self.th.merge_gap + 1
        counts = np.bincount(rules.reshape(-1), minlength=len(_RULES))
        for kind, (low, high) in _KIND_IDS.items():
            if not counts[low:high + 1].any():
                continue
            mask = (rules >= low) & (rules <= high)
            hit_rows = np.flatnonzero(mask.any(axis=1))
            mask, kinds, figs = mask[hit_rows], rules[hit_rows], figures[hit_rows]
            extreme = self._extreme(kinds, figs, low, high).any(axis=1)
            rows = first_row + hit_rows
            key = (scope, kind)
            self.where[key] = lambda found, s=scope: _where(s, found, structure)
            starts = np.concatenate(([0], np.flatnonzero(np.diff(rows) > gap) + 1))
            for start, stop in zip(starts, np.append(starts[1:], len(rows))):
                episode = self.open.get(key)
                if episode is None or rows[start] - episode.last_row > gap:
                    self._close(key)
                    episode = self.open[key] = _Open(int(steps[hit_rows[start]]), int(rows[start]))
                run = slice(start, stop)
                at = None if episode.reported else self._reported_at(episode, mask[run], extreme[run], names)
                if at is None:
                    self._grow(episode, run, mask, kinds, figs, rows, steps[hit_rows], names, low, high)
                    continue
                self._grow(episode, slice(start, start + at + 1), mask, kinds, figs, rows, steps[hit_rows],
                           names, low, high)
                episode.reported = True
                started.append((episode.last_step, self._freeze(key, episode)))
                self._grow(episode, slice(start + at + 1, stop), mask, kinds, figs, rows, steps[hit_rows],
                           names, low, high)
        return started

    def episodes(self):
        """Every reported episode so far, by first step and then kind."""
        everything = [(key, ep) for key, ep in self.closed] + [
            (key, ep) for key, ep in self.open.items() if ep.reported]
        return sorted((self._freeze(key, ep) for key, ep in everything), key=episode_order)

    def _close(self, key):
        episode = self.open.pop(key, None)
        if episode is not None and episode.reported:
            self.closed.append((key, episode))

    def _extreme(self, rules, figures, low, high):
        """Which cells `[R, N]` of the rules `low..high` hold an extreme finding: one record of it makes an episode."""
        out = np.zeros(rules.shape, bool)
        for rule_id in range(low, high + 1):
            if rule_id in _ALWAYS_EXTREME:
                out |= rules == rule_id
            elif rule_id in _EXTREME_WHEN_LARGE and getattr(self.th, _RULES[rule_id].threshold) is not None:
                limit = self.th.extreme_factor * getattr(self.th, _RULES[rule_id].threshold)
                with np.errstate(invalid="ignore"):
                    out |= (rules == rule_id) & (figures >= limit)
        return out

    def _reported_at(self, episode, mask, extreme, names):
        """The row of a run `[R, N]` at which a candidate is reported, or None."""
        carried = np.zeros(len(names), np.int64)
        if episode.counts:  # a candidate from earlier rows: few names, and the columns may have moved
            column = {name: i for i, name in enumerate(names)} if len(episode.counts) > 1 else None
            for name, count in episode.counts.items():
                i = column.get(name) if column is not None else (names.index(name) if name in names else None)
                if i is not None:
                    carried[i] = count
        # Only rows up to the first extreme one can be the first to report it.
        extreme_rows = np.flatnonzero(extreme)
        stop = int(extreme_rows[0]) + 1 if extreme_rows.size else len(mask)
        persists = (carried + np.cumsum(mask[:stop], axis=0) >= self.th.min_records).any(axis=1)
        ready = np.flatnonzero(persists | extreme[:stop])
        return int(ready[0]) if ready.size else None

    def _grow(self, episode, run, mask, kinds, figures, rows, steps, names, low, high):
        """Adds the rows `run` of one kind's hits to an `_Open` episode."""
        if run.start >= run.stop:
            return
        cells, kinds, figures = mask[run], kinds[run], figures[run]
        hits = cells.sum(axis=0)
        known, seen = episode.seen
        if known is not names and known != names:
            seen = np.array([name in episode.names for name in names], bool)
        # A long episode over many layers meets the same names at every batch: look only at new ones.
        for column in np.flatnonzero((hits > 0) & ~seen):
            episode.names.setdefault(names[column], int(column))
        seen = seen | (hits > 0)
        episode.seen = (names, seen)
        if not episode.reported:  # counts decide whether a candidate persists; after that, nothing
            for column in np.flatnonzero(hits):
                episode.counts[names[column]] = episode.counts.get(names[column], 0) + int(hits[column])
        for rule_id in range(low, high + 1):
            fired = kinds == rule_id
            if fired.any():
                rule = _RULES[rule_id]
                figure = rule.worst.reduce(figures[fired])
                previous = episode.worst.get(rule_id)
                episode.worst[rule_id] = figure if previous is None else rule.worst(previous, figure)
        episode.last_step, episode.last_row = int(steps[run.stop - 1]), int(rows[run.stop - 1])

    def _freeze(self, key, episode):
        scope, kind = key
        names = sorted(episode.names, key=episode.names.get)
        return _episode(kind, scope, names, episode.first_step, episode.last_step, episode.worst,
                        self.th, self.where[key](names))


def find_episodes(classification):
    """Groups a classification's findings into episodes.

    Findings of one kind on one axis (variables, layers, the global norm)
    form one episode while they recur within `Thresholds.merge_gap` records
    of each other, whichever names they concern. An episode needs one name
    with findings at `min_records` records, or one extreme finding (a
    non-finite gradient, a skipped step, or an exploding figure
    `extreme_factor` beyond its threshold): a one-record blip is not an
    episode. A global finding that a variable of the same class explains at
    the same step is left out.

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
    episodes = _Episodes(th)
    for grid in (c.variables, c.updates, c.layers, c.skipped):
        episodes.add(grid.scope, 0, grid.steps, grid.rules, grid.figures, grid.names, c.structure)
    g = c.global_norm
    if len(g.steps):
        codes = np.zeros((len(g.steps), max(len(c.names), 1)), np.int8)
        row = np.searchsorted(c.steps, g.steps)
        same = row < len(c.steps)
        same[same] = c.steps[row[same]] == g.steps[same]
        if len(c.names):
            codes[same] = c.codes[row[same]]
        episodes.add("global", 0, g.steps, _unexplained(g.rules, codes), g.figures, g.names)
    return episodes.episodes()


class StreamingDetector:
    """Applies the rules as records arrive, for a training callback.

    `observe` takes one recorded step, `observe_many` a batch of them; the
    two give the same episodes however the records are split, and a batch
    costs about as much as one step. It keeps only the last
    `baseline_window` grad norms of each layer and the episodes it has
    seen, so its memory does not grow with training.

    Args:
        thresholds: A `Thresholds`. Defaults to `Thresholds()`.
        model: The model summary (`keras_vg.model_summary`), or None to
            group the variables by their paths; `set_model` changes it.
            Defaults to `None`.

    Example:

    >>> detector = StreamingDetector()
    >>> names = {"grad_norm": ["a/kernel", "b/kernel"]}
    >>> detector.observe(0, {"grad_norm": [1e-7, 1.0]}, names)  # one record is no episode yet
    []
    >>> started = detector.observe(1, {"grad_norm": [1e-7, 1.0]}, names)
    >>> started[0].kind, started[0].names, started[0].first_step
    ('vanishing', ('a/kernel',), 0)
    >>> detector.observe(2, {"grad_norm": [1e-7, 1.0]}, names)  # the same episode
    []
    """

    def __init__(self, thresholds=None, model=None):
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(
                f"`thresholds` must be a Thresholds. Received: thresholds={thresholds!r}")
        self.model = model
        self.reset()

    def set_model(self, model):
        """Uses this model summary for the records that follow (e.g. at each `fit`)."""
        self.model = model
        self._structures = {}

    def reset(self):
        """Forgets everything seen, e.g. at the start of a new `fit`."""
        self._names = ()
        self._history = np.zeros((0, self.thresholds.baseline_window), np.float32)
        self._floor = np.zeros(0, np.float32)
        self._tops = np.full(self.thresholds.baseline_window, np.nan, np.float32)
        self._slot = 0
        self._rows = {scope: -1 for scope in SCOPES}
        self._episodes = _Episodes(self.thresholds)
        self._structures = {}  # variable names -> Structure, under the current model summary

    def observe(self, step, values, names):
        """Judges one recorded step.

        The same as `observe_many` on a batch of one step.

        Args:
            step: The step, as recorded.
            values: A dict from statistic name to a 1-D array over variables
                or layers, or a float for `global_grad_norm` and `skipped`.
                Statistics not recorded at this step are simply left out.
            names: A dict from statistic name to its list of variable or
                layer names, in model order.

        Returns:
            The list of `Episode`s reported at this step (empty if none).
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
                variables or layers, or `[T]` for `global_grad_norm` and
                `skipped`. Statistics not recorded in this batch are simply
                left out; one that is present covers all `T` steps.
            names: A dict from statistic name to its list of `N` variable or
                layer names, in model order.

        Returns:
            The list of `Episode`s reported within the batch, by the step
            they were reported at (the record that made them persistent or
            extreme), then first step and kind (empty if none). Each is a snapshot taken where it
            was reported; `episodes()` has their later extent.

        Example:

        >>> detector = StreamingDetector()
        >>> names = {"grad_norm": ["a/kernel", "b/kernel"]}
        >>> norms = [[1e-7, 1.0], [1e-7, 1.0], [1.0, 1.0], [1e-7, 1.0]]
        >>> started = detector.observe_many([0, 1, 2, 3], {"grad_norm": norms}, names)
        >>> [(e.kind, e.names, e.first_step, e.last_step) for e in started]
        [('vanishing', ('a/kernel',), 0, 1)]
        >>> detector.episodes()[0].last_step  # the same episode grew over step 3
        3
        """
        th = self.thresholds
        steps = np.asarray(steps, np.int64).reshape(-1)
        T = len(steps)
        started, codes = [], None
        if not T:
            return started
        skipped = values.get(SKIPPED_STAT)
        skipped = np.asarray(skipped, np.float32).reshape(T) if skipped is not None else None
        if any(s in values for s in VARIABLE_STATS):
            var_names, rows = self._align(values, names, VARIABLE_STATS, T)
            structure = self._structure(var_names)
            rows["units"] = structure.unit_norms(rows["grad_norm"]) if rows["grad_norm"] is not None else None
            rows["skipped"] = skipped
            self._resize(structure.units)
            verdicts, updates = self._judge_variables(structure, rows, T)
            codes = verdicts[0]
            first = self._advance("variable", T)
            for _, rules, figures in (verdicts, updates):
                started += self._episodes.add("variable", first, steps, rules, figures, var_names, structure)
        if any(s in values for s in LAYER_STATS):
            layer_names, rows = self._align(values, names, LAYER_STATS, T)
            guards = self._structure(()).layer_guards(layer_names)
            _, rules, figures = _layer_verdicts(rows["dead_fraction"], rows["saturation_fraction"], guards, th)
            started += self._episodes.add("layer", self._advance("layer", T), steps, rules, figures,
                                          layer_names)
        if values.get(GLOBAL_STAT) is not None:
            norm = np.asarray(values[GLOBAL_STAT], np.float32).reshape(T, 1)
            _, rules, figures = _global_verdicts(norm, th)
            if codes is not None:
                rules = _unexplained(rules, codes)
            started += self._episodes.add("global", self._advance("global", T), steps, rules, figures,
                                          (GLOBAL_STAT,))
        if skipped is not None:
            _, rules, figures = _skipped_verdicts(skipped.reshape(T, 1))
            started += self._episodes.add("global", self._advance("skipped", T), steps, rules, figures,
                                          (SKIPPED_STAT,))
        # In the order `observe` step by step would return them: by the step each was reported at.
        return [episode for _, episode in sorted(started, key=lambda p: (p[0],) + episode_order(p[1]))]

    def episodes(self):
        """Returns every episode reported so far, as `find_episodes` would list them."""
        return self._episodes.episodes()

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

    def _structure(self, names):
        """The `Structure` of these variables under the current model summary, kept while they stay."""
        names = tuple(names)
        if names not in self._structures:
            if len(self._structures) >= 4:  # the variables' names and the layers' (), and a model change
                self._structures.clear()
            self._structures[names] = Structure(names, self.model)
        return self._structures[names]

    def _resize(self, units):
        """Keeps the history of layers that remain when the model changes."""
        if units == self._names:
            return
        old = {name: i for i, name in enumerate(self._names)}
        history = np.full((len(units), self.thresholds.baseline_window), np.nan, np.float32)
        floor = np.full(len(units), np.nan, np.float32)
        for i, name in enumerate(units):
            if name in old:
                history[i], floor[i] = self._history[old[name]], self._floor[old[name]]
        self._names, self._history, self._floor = units, history, floor

    def _judge_variables(self, structure, rows, T):
        """`_judge_variables` on `T` rows after the kept history, which they then join.

        The kept records, oldest first, followed by the batch form a run that
        `classify`'s own `_history` serves, so each row sees exactly the
        previous `baseline_window` records, kept or in the batch.
        """
        window, n = self.thresholds.baseline_window, len(self._names)
        norm = rows["units"]
        if norm is None:
            top = np.full(T, np.nan, np.float32)
            kept = np.full((T, n), np.nan, np.float32)
        else:
            top, kept = _top(norm), norm
        if n:
            order = (self._slot + np.arange(window)) % window
            past = _history(np.concatenate([self._history[:, order].T, kept]),
                            np.concatenate([self._tops[order], top]), window)
            previous_min = past.previous_min[window:]
            history = _History(previous_min, _floor(previous_min, self._floor),
                               lambda r, c: past.windows(r + window, c))
            self._floor = _floor_after(previous_min, self._floor)
        else:  # no layer with kernels: nothing to take a minimum over
            history = _History(kept, None, None)
        verdicts = _judge_variables(structure, rows, top, history, self.thresholds)
        last = min(T, window)
        slots = (self._slot + np.arange(T - last, T)) % window
        self._history[:, slots] = kept[T - last:].T
        self._tops[slots] = top[T - last:]
        self._slot = (self._slot + T) % window
        return verdicts

    def _advance(self, scope, count):
        """Counts `count` more records of `scope`; returns the index of the first."""
        self._rows[scope] = self._rows.get(scope, -1) + count
        return self._rows[scope] - count + 1
