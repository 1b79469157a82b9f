"""Streaming state: the rules applied as records arrive, for a training callback.

`StreamingDetector` keeps only what the rules need of the past (the last
`baseline_window` grad norms of each layer, the running floor, the episodes
seen), and runs the same kernels as `classify` on each batch of records.
"""

import numpy as np

from keras_vg import format as fmt
from keras_vg.detect import messages
from keras_vg.detect.classification import _at
from keras_vg.detect.episodes import _Episodes, episode_order
from keras_vg.detect.kernels import (
    _floor,
    _floor_after,
    _global_verdicts,
    _History,
    _history,
    _judge_variables,
    _layer_verdicts,
    _skipped_verdicts,
    _top,
    _unexplained,
)
from keras_vg.detect.rules import GLOBAL_STAT, LAYER_STATS, SCOPES, SKIPPED_STAT, VARIABLE_STATS
from keras_vg.detect.structure import Structure
from keras_vg.detect.thresholds import Thresholds


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

    def observe_many(self, steps, values, names, skipped=None):
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
            skipped: AutoClip's `skipped` records as a pair `(steps [S],
                counts [S])` where they are recorded at steps of their own
                (AutoClip's `every`, not the monitor's), or None. As in
                `classify`: they make the `skipped` episodes on their own
                steps, and a record step they also hold is no stall. Give
                either this or `values["skipped"]`. Defaults to `None`.

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
        if skipped is not None:
            if SKIPPED_STAT in values:
                raise ValueError("Give AutoClip's `skipped` either in `values` or as `skipped`, not both.")
            skipped_steps = np.asarray(skipped[0], np.int64).reshape(-1)
            skipped_counts = np.asarray(skipped[1], np.float32).reshape(-1, 1)
            if len(skipped_steps):
                _, rules, figures = _skipped_verdicts(skipped_counts)
                started += self._episodes.add("global", self._advance("skipped", len(skipped_steps)), skipped_steps,
                                              rules, figures, (SKIPPED_STAT,))
        if not T:
            return [episode for _, episode in sorted(started, key=lambda p: (p[0],) + episode_order(p[1]))]
        if skipped is not None:
            # On the record steps, for the update rules only: a skipped step applied no update.
            skipped, judge_skipped = _at(steps, (skipped_steps, skipped_counts)), False
        else:
            skipped = values.get(SKIPPED_STAT)
            skipped = np.asarray(skipped, np.float32).reshape(T) if skipped is not None else None
            judge_skipped = skipped is not None
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
        if judge_skipped:
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
        return messages.summary(self.episodes(), max_lines)

    def _align(self, values, names, wanted, T):
        """Aligns the `wanted` statistics present onto one list of names, `[T, N]` each."""
        present = [s for s in wanted if s in values]
        axis = fmt.merge_names([list(names[s]) for s in present])
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
