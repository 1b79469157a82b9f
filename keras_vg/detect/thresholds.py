"""The numbers behind every rule, checked once where they are given.

Example:

>>> Thresholds(dead_fraction=0.9).dead_fraction
0.9
"""

import dataclasses
import numbers

import numpy as np


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

