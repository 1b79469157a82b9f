"""What the rules are: the cell classes, the episode kinds, and each rule's kind, class and threshold.

The rules' order here is their precedence: where several fire on one cell,
the most serious wins (`CLASS_PRECEDENCE` for the classes). The other
modules of `keras_vg.detect` apply this table; none defines a rule of its own.

Example:

>>> [CLASS_NAMES[code] for code in CLASS_PRECEDENCE]
['nonfinite', 'exploding', 'vanishing', 'dead', 'saturated', 'healthy']
"""

from typing import NamedTuple

import numpy as np

HEALTHY, VANISHING, EXPLODING, NONFINITE, DEAD, SATURATED = range(6)
CLASS_NAMES = ("healthy", "vanishing", "exploding", "nonfinite", "dead", "saturated")
"""Cell class names, indexed by code."""

KINDS = ("nonfinite", "exploding", "vanishing", "dead", "saturated", "stalled", "skipped")
"""Episode kinds, most serious first."""

CLASS_PRECEDENCE = tuple(CLASS_NAMES.index(kind) for kind in KINDS if kind in CLASS_NAMES) + (HEALTHY,)
"""Class codes, most serious first: the classes are the episode kinds that mark cells, plus healthy."""

SCOPES = ("variable", "layer", "global")

VARIABLE_STATS = ("grad_norm", "grad_nonfinite", "update_ratio", "weight_norm")
LAYER_STATS = ("dead_fraction", "saturation_fraction")
GLOBAL_STAT = "global_grad_norm"
SKIPPED_STAT = "skipped"


class _Rule(NamedTuple):
    name: str
    kind: str
    code: int
    worst: np.ufunc  # reduces an episode's figures to the worst one (the total for `skipped`)
    threshold: str  # the `Thresholds` field the figure is compared with


# A rule's id is its index here. Ids are in precedence order, so the lowest id
# that fires on a cell wins it, and each kind's ids are contiguous. What each
# rule's figure means in words is `messages.RULE_TEXTS`.
_RULES = (
    None,
    _Rule("nonfinite", "nonfinite", NONFINITE, np.fmax, ""),
    _Rule("spike", "exploding", EXPLODING, np.fmax, "spike_factor"),
    _Rule("grad_norm", "exploding", EXPLODING, np.fmax, "exploding_norm"),
    _Rule("update_ratio", "exploding", EXPLODING, np.fmax, "exploding_update_ratio"),
    _Rule("vanishing", "vanishing", VANISHING, np.fmin, "vanishing_ratio"),
    _Rule("dead", "dead", DEAD, np.fmax, "dead_fraction"),
    _Rule("saturated", "saturated", SATURATED, np.fmax, "saturation_fraction"),
    _Rule("below_resolution", "stalled", HEALTHY, np.fmin, "resolution_ratio"),
    _Rule("stalled", "stalled", HEALTHY, np.fmin, "stalled_ratio"),
    _Rule("skipped", "skipped", HEALTHY, np.add, ""),
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

