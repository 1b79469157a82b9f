"""Episodes: contiguous regions of one kind of finding, grouped from rows of verdicts.

`find_episodes` groups a whole run's verdicts; `StreamingDetector` feeds
`_Episodes` batch by batch and gets the same episodes. An episode carries
data (`rule`, `figure`, `threshold`); `messages` words it.
"""

import dataclasses

import numpy as np

from keras_vg.detect import messages
from keras_vg.detect.kernels import _unexplained
from keras_vg.detect.rules import (
    _ALWAYS_EXTREME,
    _EXTREME_WHEN_LARGE,
    _KIND_IDS,
    _RULES,
    KINDS,
    SCOPES,
)


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


def _episode(kind, scope, names, first_step, last_step, worst, th, where):
    """Builds an Episode; `worst` maps rule id to the worst figure seen, `where` words the names."""
    rule_id = min(worst)
    rule = _RULES[rule_id]
    threshold = float(getattr(th, rule.threshold)) if rule.threshold else 0.0
    figure = float(worst[rule_id])
    message = messages.episode_message(kind, where, first_step, last_step, rule.name, figure, threshold)
    return Episode(kind, scope, tuple(names), int(first_step), int(last_step), rule.name,
                   figure, threshold, message)


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
            self.where[key] = lambda found, s=scope: messages.where(s, found, structure)
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

    >>> from keras_vg.detect import classify
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
