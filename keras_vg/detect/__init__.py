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

The package has one module per job; import from the package itself:

| module           | job                                                                    |
|------------------|------------------------------------------------------------------------|
| `rules`          | the classes and their precedence, the episode kinds, the rule table    |
| `thresholds`     | `Thresholds`, the numbers behind the rules                             |
| `structure`      | `Structure`: which variables make a layer and which decide             |
| `kernels`        | the rules applied to rows of records, for whole runs and streaming     |
| `classification` | whole runs: `classify`, `zero_gradients`                               |
| `episodes`       | `Episode`s grouped from the verdicts: `find_episodes`                  |
| `streaming`      | `StreamingDetector`, the rules as records arrive                       |
| `messages`       | the words: kind titles, what each rule measured, `Episode.message`     |

Example:

>>> from keras_vg.reader import read_run                   # doctest: +SKIP
>>> result = classify(read_run("logs/run1"))                # doctest: +SKIP
>>> for episode in find_episodes(result):                   # doctest: +SKIP
...     print(episode.message)
"""

from keras_vg.activations import NEVER_DEAD
from keras_vg.detect.classification import Classification, Grid, classify, zero_gradients
from keras_vg.detect.episodes import Episode, episode_order, find_episodes
from keras_vg.detect.kernels import _nanmedian_rows as _nanmedian_rows  # checked against numpy by the tests
from keras_vg.detect.kernels import _previous_min as _previous_min  # checked against numpy by the tests
from keras_vg.detect.messages import KIND_TITLES, measured
from keras_vg.detect.rules import _KIND_IDS as _KIND_IDS  # the tests check each kind's ids are contiguous
from keras_vg.detect.rules import (
    CLASS_NAMES,
    CLASS_PRECEDENCE,
    DEAD,
    EXPLODING,
    GLOBAL_STAT,
    HEALTHY,
    KINDS,
    LAYER_STATS,
    NONFINITE,
    RULE_NAMES,
    SATURATED,
    SCOPES,
    SKIPPED_STAT,
    VANISHING,
    VARIABLE_STATS,
)
from keras_vg.detect.streaming import StreamingDetector
from keras_vg.detect.structure import ROLES, Structure, variable_role
from keras_vg.detect.thresholds import Thresholds

__all__ = [
    "CLASS_NAMES",
    "CLASS_PRECEDENCE",
    "DEAD",
    "EXPLODING",
    "GLOBAL_STAT",
    "HEALTHY",
    "KINDS",
    "KIND_TITLES",
    "LAYER_STATS",
    "NEVER_DEAD",
    "NONFINITE",
    "ROLES",
    "RULE_NAMES",
    "SATURATED",
    "SCOPES",
    "SKIPPED_STAT",
    "VANISHING",
    "VARIABLE_STATS",
    "Classification",
    "Episode",
    "Grid",
    "StreamingDetector",
    "Structure",
    "Thresholds",
    "classify",
    "episode_order",
    "find_episodes",
    "measured",
    "variable_role",
    "zero_gradients",
]
