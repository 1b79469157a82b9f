"""The diagnosis: what `detect` found, in plain words, with remedies for this model.

The findings are `keras_vg.detect`'s episodes, unchanged: this module adds no
rule of its own. It maps their variables to layers through the model summary
that `GradientMonitor` writes (`keras_vg.model_summary`), names the layers'
activations and initialisers, and picks the remedies that fit the model: no
BatchNormalization advice for a model that has it, LSTM/GRU for a SimpleRNN,
clipping for exploding gradients, He initialisation with ReLU-family
activations. Two more sources join them: the `nonfinite` events the monitor
writes for non-finite steps between records (each a finding, unless a
recorded episode covers it), and the gradients that are zero by construction
(`detect.zero_gradients`), which are notes, not findings. Where
`keras_vg.AutoClip` wrote into the run, it reports when clipping switched on
and off and what it clipped and skipped, and judges each exploding finding by
the updates clipping let through instead of suggesting clipping again.
TensorFlow-free, like the reader.

Example:

>>> from keras_vg.reader import read_run              # doctest: +SKIP
>>> diagnosis = diagnose(read_run("logs/run1"))       # doctest: +SKIP
>>> print(diagnosis)                                  # doctest: +SKIP
>>> [f.kind for f in diagnosis.findings]              # doctest: +SKIP
['vanishing', 'stalled']
"""

import dataclasses
import re

import numpy as np

from keras_vg import detect
from keras_vg.activations import RELU_FAMILY, SATURATING

# Initialisers that scale with fan-in/fan-out; anything else (RandomNormal with
# a fixed stddev, Zeros, ...) is a likely cause of vanishing or exploding.
SCALED_INITS = frozenset({"GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform",
                          "LecunNormal", "Orthogonal", "VarianceScaling"})
HE_INITS = frozenset({"HeUniform", "HeNormal"})
CLIP_EVENT_KINDS = ("clip_on", "clip_off", "skip")
# The clipping remedy by how the run's AutoClip fared (`remedies_for`'s `clipping`).
CLIPPING_REMEDIES = {
    None: ("clipping", "gradient clipping that switches on when gradients explode: "
                       "add keras_vg.AutoClip() to callbacks"),
    "armed": ("clip_earlier", "clipping from the first step, which a spike trigger cannot do during its "
                              "warm-up: keras_vg.AutoClip(\"percentile\", trigger=None)"),
    "loose": ("tighter_clipping", "a lower clipping threshold: a fixed one below this run's, "
                                  "keras_vg.AutoClip(keras_vg.GlobalNorm(threshold=...)), or a smaller "
                                  "z (ZScore) or p (Percentile)"),
}

_VERBS = {
    "vanishing": "gradients vanish",
    "exploding": "gradients explode",
    "nonfinite": "gradients are NaN or infinite",
    "dead": "units pass no gradient for a whole batch",
    "saturated": "activations saturate at their asymptotes",
    "stalled": "weights barely change",
    "skipped": "steps with a non-finite gradient were skipped",
}
# "Dead" means no gradient flows; how that happens depends on the activation's derivative.
_DEAD_VERBS = {
    "relu": "ReLU units are dead: they output 0 for every sample of a batch, so no gradient flows through them",
    "relu6": "ReLU6 units pass no gradient: they sit at 0 or 6 for every sample of a batch",
    "elu": "ELU units pass almost no gradient: they sit deep on their saturated negative side for every sample",
    "selu": "SELU units pass almost no gradient: they sit deep on their saturated negative side for every sample",
}
# Why a gradient is zero by construction (`structural_zeros` reasons), and what to do about it.
_ZERO_REASONS = {
    "batch_norm_follows": ("BatchNormalization follows and subtracts each channel's batch mean, which removes the "
                           "bias", "use_bias=False on {layers} saves the parameters (BatchNormalization's beta "
                                  "is the bias)"),
    "attention_key_bias": ("the softmax over the keys ignores a shift shared by every key", "nothing to change"),
    None: ("its gradient stayed below {ratio} of its layer's kernels at every record: something after the layer "
           "(a normalisation?) removes a constant shift", "use_bias=False there if so"),
}


@dataclasses.dataclass(frozen=True)
class Remedy:
    """One remedy: a stable `key` for code and a `text` for people.

    Keys: `gating`, `relu_he`, `he_init`, `scaled_init`, `batch_norm`,
    `residual`, `fewer_layers`, `clipping`, `clip_earlier`,
    `tighter_clipping`, `lower_lr`, `leaky`, `bias_init`, `check_data`,
    `scale_inputs`, `adaptive_optimizer`, `output_layer`.
    """

    key: str
    text: str


@dataclasses.dataclass(frozen=True)
class Finding:
    """One episode of `keras_vg.detect` (or a `nonfinite` event), mapped to layers, with remedies.

    Attributes:
        kind: One of `detect.KINDS`: `nonfinite`, `exploding`, `vanishing`,
            `dead`, `saturated`, `stalled`, `skipped` (steps AutoClip
            skipped: what it did, with no remedy of its own).
        scope: `"variable"`, `"layer"` or `"global"` (the global norm, the
            skipped steps, or a `nonfinite` event between records).
        layers: The layers concerned, in model order (empty for `global`).
        first_step: The first recorded step of the episode.
        last_step: Its last recorded step.
        ongoing: True when the episode lasts to the run's last record.
        rule: The `detect` rule behind `figure` (`detect.RULE_NAMES`).
        figure: The worst value that rule measured.
        threshold: The threshold it was compared with.
        activations: The concerned layers' activations (e.g. `("sigmoid",)`).
        initializers: Their kernel initialisers, snake_case
            (e.g. `("glorot_uniform",)`).
        first_last_ratio: For `vanishing`: the median, over the episode's
            steps, of the first kernel's grad norm over the last kernel's;
            None otherwise.
        clipped: For `exploding` and `nonfinite` in a run with
            `keras_vg.AutoClip`: the steps it clipped during the episode
            (from its `clipped` records); None otherwise.
        skipped: Likewise, the non-finite steps it skipped during the
            episode; None otherwise.
        remedies: `Remedy` tuple, the most fitting first.
        episode: The `detect.Episode` itself (variable names and message);
            for a `nonfinite` event, an episode built from it (rule
            `nonfinite_event`, its source as the name).
        message: The finding in plain words, remedies included.
    """

    kind: str
    scope: str
    layers: tuple
    first_step: int
    last_step: int
    ongoing: bool
    rule: str
    figure: float
    threshold: float
    activations: tuple
    initializers: tuple
    first_last_ratio: float | None
    clipped: int | None
    skipped: int | None
    remedies: tuple
    episode: detect.Episode
    message: str


@dataclasses.dataclass(frozen=True)
class Note:
    """Information that is not a problem: gradients that are zero by construction.

    Attributes:
        kind: `"zero_gradient"`.
        reason: Why (`batch_norm_follows`, `attention_key_bias`), or None
            where only the records show it.
        variables: The variables concerned, in model order.
        layers: Their layers.
        ratio: The largest ratio of their grad norm to their layers'
            kernels' seen in the records (None without `grad_norm`).
        text: One line for the report, with the fitting remark.
    """

    kind: str
    reason: str | None
    variables: tuple
    layers: tuple
    ratio: float | None
    text: str


@dataclasses.dataclass(frozen=True)
class Clipping:
    """What `keras_vg.AutoClip` did in a run, read from its records and events.

    Attributes:
        events: Its events (`clip_on`, `clip_off`, `skip`), dicts from
            `Run.events()` by step, with `global_grad_norm` and
            `clip_threshold` (None where not finite).
        switched_on: Steps at which clipping switched on.
        switched_off: Steps at which it switched off again (armed).
        on_from_start: True when it clipped before any switch (`AutoClip(
            trigger=None)`).
        clipped: Steps clipped: the sum of the `clipped` records.
        clipped_range: `(first, last)` recorded steps whose record counts a
            clipped step (with `every > 1`, a record counts the steps since
            the previous one), or None.
        skipped: Non-finite steps skipped and not applied: the sum of the
            `skipped` records (the `skip` events where there are no records).
        skipped_steps: The steps of the `skip` events.
        on_at_end: Whether clipping was on at the run's last step.
        records: `{"clipped": (steps, values), "skipped": ...}`, the records
            behind the counts (`Run.stat`'s steps and values).
    """

    events: tuple
    switched_on: tuple
    switched_off: tuple
    on_from_start: bool
    clipped: int
    clipped_range: tuple | None
    skipped: int
    skipped_steps: tuple
    on_at_end: bool
    records: dict = dataclasses.field(repr=False, compare=False)

    def on_at(self, step):
        """Whether clipping was on at `step`: from a `clip_on` step on, up to a `clip_off` step included."""
        on = self.on_from_start
        for event in self.events:
            if event["step"] > step or (event["step"] == step and event["kind"] == "clip_off"):
                break
            if event["kind"] != "skip":
                on = event["kind"] == "clip_on"
        return on

    def count(self, name, steps):
        """The sum of the `clipped` or `skipped` records at these steps."""
        if name in self.records:
            recorded, values = self.records[name]
            return int(np.nansum(values[np.isin(recorded, steps)]))
        # Events only (no records): each skip event is one skipped step.
        return sum(e["kind"] == "skip" and e["step"] in steps for e in self.events) if name == "skipped" else 0

    def text(self):
        """One line for the report: switches, counts and step ranges, the state at the end."""
        switches = [e for e in self.events if e["kind"] != "skip"]
        if switches:
            parts = [", ".join(_switch(e) for e in switches[:6])
                     + (f" and {len(switches) - 6} more switches" if len(switches) > 6 else "")]
        else:
            parts = ["on from the first step" if self.on_from_start else "armed, never switched on"]
        if self.clipped:
            first, last = self.clipped_range
            parts.append(f"clipped {_steps(self.clipped)}, {_when(first, last, False)}")
        else:
            parts.append("clipped no step")
        if self.skipped:
            parts.append(skipped_text(self.skipped, self.skipped_steps))
        if switches:
            parts.append("on at the last step" if self.on_at_end
                         else f"off (armed) from step {switches[-1]['step']} on")
        return "Clipping (keras_vg.AutoClip): " + "; ".join(parts) + "."


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` returns. `str(diagnosis)` is the report `keras-vg report` prints.

    Attributes:
        log_dir: The run directory.
        model: The model summary (`keras_vg.model_summary`), or None when the
            run has none; remedies are then generic.
        first_step: The first recorded step (None if nothing was recorded).
        last_step: The last recorded step.
        first_last_ratio: Median over the run of the first kernel's grad
            norm over the last kernel's (None without `grad_norm`).
        records: The number of recorded steps.
        findings: `Finding` tuple, by first step, most serious kind first.
        notes: `Note` tuple: information that is not a problem (gradients
            that are zero by construction). They do not make a run
            unhealthy.
        clipping: What `keras_vg.AutoClip` did (a `Clipping`), or None when
            the run has no AutoClip records.
        thresholds: The `detect.Thresholds` used.
    """

    log_dir: str
    model: dict | None
    first_step: int | None
    last_step: int | None
    first_last_ratio: float | None
    records: int
    findings: tuple
    notes: tuple
    clipping: Clipping | None
    thresholds: detect.Thresholds

    @property
    def kinds(self):
        """The set of finding kinds present, e.g. `{"vanishing", "stalled"}`."""
        return {finding.kind for finding in self.findings}

    @property
    def healthy(self):
        """True when there are no findings (notes do not count)."""
        return not self.findings

    def text(self, max_findings=20):
        """The report as text; at most `max_findings` findings are spelled out."""
        lines = [f"keras-vg report for {self.log_dir}"]
        overview = _model_line(self.model)
        if self.first_step is not None:
            overview += f"; recorded steps {self.first_step}-{self.last_step}"
        if self.first_last_ratio is not None:
            overview += f"; first/last gradient-norm ratio {self.first_last_ratio:.2g}"
        lines.append(overview + ".")
        if self.model is None:
            lines.append("This run has no model summary: the remedies below are generic.")
        if self.clipping is not None:
            lines.append(self.clipping.text())
        if not self.findings:
            lines.append("")
            lines.append("No findings: no vanishing, exploding or non-finite gradients, dead or saturated "
                         "units, or stalled layers (rules and thresholds: docs/DETECTION.md).")
            if self.records < self.thresholds.min_records:
                lines.append(f"Only {_steps(self.records, 'recorded ')}: findings other than extreme ones (non-finite "
                             f"values, explosions {self.thresholds.extreme_factor:g}x beyond their threshold) need "
                             f"{self.thresholds.min_records} records.")
        printed = set()
        for finding in self.findings[:max_findings]:
            lines.append("")
            message = finding.message
            if finding.remedies and finding.remedies in printed:  # repeated episodes: say them once
                message = message.rsplit("\n", 1)[0] + "\n  Remedies: as above."
            printed.add(finding.remedies)
            lines.append(message)
        if len(self.findings) > max_findings:
            lines.append("")
            lines.append(f"... and {len(self.findings) - max_findings} more findings "
                         "(Run.diagnose().findings has them all).")
        if self.notes:
            lines.append("")
            lines.append("Notes (information, not problems):")
            lines += [f"  - {note.text}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self):
        return self.text()


def diagnose(run, thresholds=None):
    """Diagnoses a run: `detect`'s episodes mapped to layers, with remedies.

    Args:
        run: A `keras_vg.reader.Run`.
        thresholds: A `keras_vg.detect.Thresholds`, or None for the
            defaults. Defaults to `None`.

    Returns:
        A `Diagnosis`.

    Example:

    >>> diagnosis = diagnose(read_run("logs/run1"))        # doctest: +SKIP
    >>> "vanishing" in diagnosis.kinds                      # doctest: +SKIP
    True
    >>> diagnosis.findings[0].remedies[0].key               # doctest: +SKIP
    'relu_he'
    """
    classification = detect.classify(run, thresholds)
    episodes = detect.find_episodes(classification)
    summary = run.model()
    layers = _Layers(summary, classification.structure)
    norm = run.stat("grad_norm") if "grad_norm" in run.stats() else None
    update = run.stat("update_ratio") if "update_ratio" in run.stats() else None
    clipping = _clipping(run)
    all_steps = [g.steps for g in (classification.variables, classification.layers, classification.global_norm)
                 if len(g.steps)]
    steps = np.unique(np.concatenate(all_steps)) if all_steps else np.zeros(0, np.int64)
    # Stalled updates in layers whose gradients vanish are a consequence, not a second problem.
    vanishing = {name for e in episodes if e.kind == "vanishing" for name in layers.names_of(e.names, e.scope)}
    # Findings that start once the gradients are non-finite follow from the NaN, not from the model.
    nonfinite = tuple((e.first_step, e.last_step) for e in episodes if e.kind == "nonfinite")
    context = _Context(layers, norm, update, clipping, summary, vanishing, nonfinite, classification.thresholds)
    findings = []
    for episode in episodes:
        grid = {"layer": classification.layers, "global": classification.global_norm}.get(
            episode.scope, classification.variables)
        if episode.kind == "skipped":
            grid = classification.skipped
        findings.append(_finding(episode, grid.steps, context, grid.names))
    findings += [_finding(episode, steps, context) for episode in _uncovered_events(run, episodes, steps)]
    return Diagnosis(
        log_dir=run.log_dir,
        model=summary,
        first_step=int(steps[0]) if len(steps) else None,
        last_step=int(steps[-1]) if len(steps) else None,
        first_last_ratio=first_last_ratio(norm),
        records=len(steps),
        findings=tuple(sorted(findings, key=lambda f: detect.episode_order(f.episode))),
        notes=tuple(_notes(detect.zero_gradients(run, summary, classification.thresholds))),
        clipping=clipping,
        thresholds=classification.thresholds,
    )


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every finding of a run is built from."""

    layers: object
    norm: tuple | None
    update: tuple | None
    clipping: Clipping | None
    summary: dict | None
    vanishing: set
    nonfinite: tuple
    thresholds: detect.Thresholds


def _uncovered_events(run, episodes, steps):
    """The monitor's `nonfinite` events (non-finite steps between records) that no recorded episode covers.

    An event covers steps between two records; a recorded non-finite episode
    covers it when its steps reach into that stretch from the record before
    to the record after. Returns them as `detect.Episode`s, one per event,
    built from the event's fields.
    """
    recorded = [(e.first_step, e.last_step) for e in episodes if e.kind == "nonfinite"]
    out = []
    for event in run.events():
        if event.get("kind") != "nonfinite":
            continue
        first = int(event["step"])
        last = int(event.get("last_step", first))
        before = steps[steps <= first]
        after = steps[steps >= last]
        low = int(before[-1]) if before.size else first
        high = int(after[0]) if after.size else last
        if any(start <= high and end >= low for start, end in recorded):
            continue
        source = str(event.get("source", "loss"))
        what = _SOURCES.get(source, f"the {source} was not finite")
        text = f"Non-finite values between records, steps {first}-{last}: {what} (seen by the monitor between " \
               f"recorded steps)."
        out.append(detect.Episode("nonfinite", "global", (source,), first, last, "nonfinite_event",
                                  float("nan"), 0.0, text))
    return out


# What a `nonfinite` event's source says happened.
_SOURCES = {"loss": "the loss was not finite",
            "loss_scale": "loss scaling found non-finite gradients and skipped those steps",
            "weights": "the weights were not finite"}


def _notes(zeros):
    """The report's notes on gradients that are zero by construction, one per reason."""
    by_reason = {}
    for zero in zeros:
        by_reason.setdefault(zero["reason"], []).append(zero)
    notes = []
    for reason, group in by_reason.items():
        why, remark = _ZERO_REASONS.get(reason, _ZERO_REASONS[None])
        variables = tuple(z["variable"] for z in group)
        layers = tuple(dict.fromkeys(z["layer"] for z in group))
        ratios = [z["ratio"] for z in group if z["ratio"] is not None]
        ratio = max(ratios) if ratios else None
        recorded = f" (recorded: at most {ratio:.1g} of the kernels' norm)" if ratio is not None and reason else ""
        what = variables[0] if len(variables) == 1 else f"{len(variables)} variables ({_short_list(variables)})"
        layer_words = _short_list(layers)
        text = (f"Zero gradient by construction in {what}: "
                + why.format(ratio=f"{ratio:.1g}" if ratio is not None else "?")
                + f"{recorded}; {remark.format(layers=layer_words)}.")
        notes.append(Note("zero_gradient", reason, variables, layers, ratio, text))
    return notes


def _short_list(names):
    names = list(names)
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ..., {names[-1]}"


def first_last_ratio(grad_norm, first_step=None, last_step=None):
    """Median ratio of the first kernel's gradient norm to the last kernel's.

    The first and last variables named `.../kernel` stand for the input and
    output layers (all variables, if fewer than two kernels). Much below 1:
    the lower layers get far smaller gradients than the upper ones.

    Args:
        grad_norm: `(steps, names, values)` as `Run.stat("grad_norm")`
            returns it, or None.
        first_step: Only steps from this one on. Defaults to `None` (all).
        last_step: Only steps up to this one. Defaults to `None` (all).

    Returns:
        A float, or None when there is nothing to compare.
    """
    if grad_norm is None:
        return None
    steps, names, values = grad_norm
    kernels = [i for i, name in enumerate(names) if name.rsplit("/", 1)[-1] == "kernel"]
    if len(kernels) < 2:
        kernels = list(range(len(names)))
    if len(kernels) < 2 or not len(steps):
        return None
    keep = np.ones(len(steps), bool)
    if first_step is not None:
        keep &= steps >= first_step
    if last_step is not None:
        keep &= steps <= last_step
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = values[keep, kernels[0]] / values[keep, kernels[-1]]
    ratio = ratio[np.isfinite(ratio)]
    return float(np.median(ratio)) if ratio.size else None


# ---------------------------------------------------------------------------
# Layers: what the model summary says about the layers an episode concerns.


class _Layers:
    """Looks up layers by variable path (as `detect` groups them) or layer name in the model summary."""

    def __init__(self, summary, structure):
        entries = (summary or {}).get("layers", [])
        self.entries = {entry["name"]: entry for entry in entries}
        self.of_variable = dict(zip(structure.names, structure.layers))

    def name_of(self, name, scope):
        if scope == "layer":
            return name
        # A variable detect did not see (none here) falls back as detect's own fallback does.
        return self.of_variable.get(name) or name.rsplit("/", 1)[0]

    def names_of(self, names, scope):
        out = []
        for name in names:
            layer = self.name_of(name, scope)
            if layer not in out:
                out.append(layer)
        return out

    def describe(self, layer_names):
        """`(activations, initializers)`: the distinct ones among these layers, in order."""
        activations, initializers = [], []
        for name in layer_names:
            entry = self.entries.get(name, {})
            activation, init = entry.get("activation"), entry.get("kernel_initializer")
            if activation and activation != "linear" and activation not in activations:
                activations.append(activation)
            if init and _snake(init) not in initializers:
                initializers.append(_snake(init))
        return tuple(activations), tuple(initializers)


def _snake(class_name):
    """`GlorotUniform` -> `glorot_uniform`, the string Keras accepts for it."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def _layer_range(layers, candidates):
    """`dense..dense_5` when the layers are a run of `candidates`, else a short list."""
    if not layers:
        return "the global gradient norm"
    if len(layers) == 1:
        return f"layer {layers[0]}"
    index = [candidates.index(name) for name in layers if name in candidates]
    if len(index) == len(layers) and index == list(range(index[0], index[0] + len(index))):
        return f"{len(layers)} layers {layers[0]}..{layers[-1]}"
    if len(layers) <= 6:
        return "layers " + ", ".join(layers)
    return f"{len(layers)} layers {', '.join(layers[:3])}, ..., {layers[-1]}"


def _when(finding_first, finding_last, ongoing):
    if ongoing and finding_first != finding_last:
        return f"from step {finding_first} on"
    if finding_first == finding_last:
        return f"at step {finding_first}"
    return f"at steps {finding_first}-{finding_last}"


def _steps(count, adjective=""):
    return f"{count} {adjective}step{'' if count == 1 else 's'}"


def skipped_text(count, steps):
    """`12 steps skipped by AutoClip (non-finite gradients, not applied), steps 30-200`.

    Args:
        count: How many steps AutoClip skipped.
        steps: The steps of its `skip` events, where known (may be empty).
    """
    text = f"{_steps(count)} skipped by AutoClip (non-finite gradients, not applied)"
    if len(steps):
        text += f", {_when(min(steps), max(steps), False)}"
    return text


def _finding(episode, grid_steps, context, grid_names=()):
    """A `Finding` from an episode: its layers, their facts, the remedies and the report's lines.

    Args:
        episode: A `detect.Episode` (or one built from a `nonfinite` event).
        grid_steps: The recorded steps of its grid (whether it lasts to the end).
        context: The run's `_Context`.
        grid_names: Its grid's names, for the words of a range of layers.
    """
    layers, thresholds = context.layers, context.thresholds
    candidates = layers.names_of(grid_names, episode.scope) if episode.scope != "global" else []
    concerned = tuple(layers.names_of(episode.names, episode.scope)) if episode.scope != "global" else ()
    activations, initializers = layers.describe(concerned)
    ongoing = bool(len(grid_steps)) and episode.last_step == int(grid_steps[-1])
    ratio = None
    if episode.kind == "vanishing":
        ratio = first_last_ratio(context.norm, episode.first_step, episode.last_step)
    clipped = skipped = clip_line = clip_state = None
    if context.clipping is not None and episode.kind in ("exploding", "nonfinite"):
        clipped, skipped, clip_line, clip_state = _clipping_during(episode, grid_steps, context.update,
                                                                   context.clipping, thresholds)
    remedies = remedies_for(episode.kind, concerned, context.summary, clipping=clip_state)
    consequence = episode.kind == "stalled" and concerned and set(concerned) <= context.vanishing
    if consequence:  # the vanishing finding lists the shared remedies; keep only the extra ones
        shared = {r.key for r in remedies_for("vanishing", concerned, context.summary)}
        remedies = [r for r in remedies if r.key not in shared]
    after_nan = episode.kind not in ("nonfinite", "skipped") and any(
        first <= episode.first_step <= last for first, last in context.nonfinite)
    if after_nan:  # NaN weights make every other statistic meaningless: the non-finite finding has the remedies
        remedies = []
    remedies = tuple(remedies)

    if episode.rule == "nonfinite_event":  # its message is already in words, from the event's fields
        lines = [episode.message]
    else:
        headline = f"{_headline_where(episode, concerned, candidates, activations, initializers)}: " \
                   f"{_verb(episode, activations)} {_when(episode.first_step, episode.last_step, ongoing)}"
        if ratio is not None:
            headline += f"; first/last norm ratio {ratio:.2g}"
        if consequence:
            headline += ", a consequence of the vanishing gradients there"
        if after_nan:
            headline += ", after the gradients became non-finite (a consequence, not a cause)"
        lines = [f"{detect.KIND_TITLES[episode.kind]} - {headline}.",
                 f"  Measured: {detect.measured(episode)}."]
    if clip_line:
        lines.append(clip_line)
    if remedies:
        lines.append("  Remedies for this model: " + "; ".join(r.text for r in remedies) + ".")
    return Finding(
        kind=episode.kind, scope=episode.scope, layers=concerned,
        first_step=episode.first_step, last_step=episode.last_step, ongoing=ongoing,
        rule=episode.rule, figure=episode.figure, threshold=episode.threshold,
        activations=activations, initializers=initializers, first_last_ratio=ratio,
        clipped=clipped, skipped=skipped, remedies=remedies, episode=episode, message="\n".join(lines),
    )


def _headline_where(episode, concerned, candidates, activations, initializers):
    if episode.kind == "skipped":
        return "training"
    described = ", ".join(activations + initializers)
    return _layer_range(list(concerned), candidates) + (f" ({described})" if described else "")


def _verb(episode, activations):
    """The finding's verb, worded for the rule, the scope and, for dead units, the activation."""
    if episode.kind == "stalled" and episode.rule == "below_resolution":
        return "updates are lost to float32 rounding"
    if episode.scope == "global" and episode.kind in ("exploding", "nonfinite"):
        return {"exploding": "explodes", "nonfinite": "is NaN or infinite"}[episode.kind]
    if episode.kind == "dead" and len(set(activations)) == 1 and activations[0] in _DEAD_VERBS:
        return _DEAD_VERBS[activations[0]]
    if episode.kind == "skipped":
        count = int(episode.figure)
        return f"{_steps(count)} with a non-finite gradient {'was' if count == 1 else 'were'} skipped by AutoClip"
    return _VERBS[episode.kind]


def _clipping(run):
    """The run's `Clipping`, or None when no `keras_vg.AutoClip` recorded into it."""
    events = tuple(e for e in run.events() if e.get("kind") in CLIP_EVENT_KINDS)
    records = {}
    for name in ("clipped", "skipped"):
        if name in run.stats():
            steps, _, values = run.stat(name)
            records[name] = (steps, values)
    if not events and not records:
        return None
    switches = [e for e in events if e["kind"] != "skip"]
    steps, counts = records.get("clipped", (np.zeros(0, np.int64), np.zeros(0, np.float32)))
    clipped_at = steps[counts > 0]
    clipped = int(np.nansum(counts))
    # Without a trigger, clipping is on from the first step and no clip_on is recorded.
    on_from_start = switches[0]["kind"] == "clip_off" if switches else clipped > 0
    skipped_steps = tuple(e["step"] for e in events if e["kind"] == "skip")
    return Clipping(
        events=events,
        switched_on=tuple(e["step"] for e in switches if e["kind"] == "clip_on"),
        switched_off=tuple(e["step"] for e in switches if e["kind"] == "clip_off"),
        on_from_start=on_from_start,
        clipped=clipped,
        clipped_range=(int(clipped_at[0]), int(clipped_at[-1])) if clipped_at.size else None,
        skipped=int(np.nansum(records["skipped"][1])) if "skipped" in records else len(skipped_steps),
        skipped_steps=skipped_steps,
        on_at_end=switches[-1]["kind"] == "clip_on" if switches else on_from_start,
        records=records,
    )


def _clipping_during(episode, recorded, update, clipping, thresholds):
    """How AutoClip fared in an exploding or non-finite episode.

    Returns:
        `(clipped, skipped, line, state)`: the steps it clipped and skipped
        during the episode, the report's line on it, and `remedies_for`'s
        `clipping` argument.
    """
    steps = [int(s) for s in recorded if episode.first_step <= s <= episode.last_step]
    on = [s for s in steps if clipping.on_at(s)]
    clipped, skipped = clipping.count("clipped", steps), clipping.count("skipped", steps)
    if not on:
        never = "" if clipping.switched_on or clipping.on_from_start else " (it never switched on)"
        return clipped, skipped, f"  Clipping: AutoClip was armed but not on during these steps{never}.", "armed"
    counts = (f"it clipped {_steps(clipped)}, and {_steps(skipped)} {'was' if skipped == 1 else 'were'} "
              "skipped by AutoClip (not applied)")
    if len(on) == len(steps):
        line = f"  Clipping: AutoClip was on throughout the {_steps(len(steps), 'recorded ')} of this episode; {counts}"
    else:
        line = (f"  Clipping: AutoClip was on at {len(on)} of the {_steps(len(steps), 'recorded ')} of this "
                f"episode; {counts}")
    state = "bounded"
    # The update ratio is measured after clipping: whether the steps it let through were still too
    # large. Weight matrices only: a bias near 0 has a huge ratio for a tiny update (DIAGNOSIS.md).
    limit = thresholds.exploding_update_ratio
    if update is not None and limit is not None:
        update_steps, names, values = update
        at = np.isin(update_steps, on)
        kernels = [i for i, name in enumerate(names) if detect.variable_role(name) == "kernel"]
        update_steps, values = update_steps[at], values[at][:, kernels or slice(None)]
        peak = np.max(np.where(np.isnan(values), -np.inf, values), axis=1, initial=-np.inf)
        if peak.size and peak.max() > -np.inf:  # NaN is a zero weight's ratio: no figure there
            worst = int(np.argmax(peak))
            if peak[worst] > limit:
                state = "loose"
                line += (f"; the weight updates still exploded (update ratio up to {peak[worst]:.2g} at step "
                         f"{update_steps[worst]}, threshold {limit:.2g})")
            else:
                line += f"; the weight updates stayed bounded (update ratio at most {peak[worst]:.2g})"
    return clipped, skipped, line + ".", state


# ---------------------------------------------------------------------------
# Remedies.


def _facts(layer_names, summary):
    """What the remedies depend on, read from the summary for the concerned layers."""
    entries = (summary or {}).get("layers", [])
    by_name = {entry["name"]: entry for entry in entries}
    concerned = [by_name[n] for n in layer_names if n in by_name] or entries
    weighted = [e for e in entries if e.get("kernel_initializer")]
    classes = [e["class"] for e in weighted if e["class"] not in ("SimpleRNN", "LSTM", "GRU", "Embedding")]
    main_class = max(set(classes), key=classes.count) if classes else "Dense"
    activations = {e.get("activation") for e in concerned if e.get("activation")}
    if not activations - {"linear"}:  # e.g. a kernel's layer has no activation: look at the whole model
        activations = {e.get("activation") for e in entries if e.get("activation")}
    inits = {e["kernel_initializer"] for e in concerned if e.get("kernel_initializer")}
    negative_bias = sorted({e["bias_constant"] for e in concerned if e.get("bias_constant", 0) < 0})
    recurrent = set((summary or {}).get("recurrent", []))
    output = weighted[-1]["name"] if weighted else None
    return {
        "output_only": bool(layer_names) and set(layer_names) == {output},
        "known": summary is not None,
        "saturating": bool(activations & SATURATING.keys()),
        "relu_family": bool(activations & RELU_FAMILY),
        "plain_relu": "relu" in activations,
        "he": bool(inits) and inits <= HE_INITS,
        "unscaled_inits": sorted(_snake(i) for i in inits - SCALED_INITS),
        "batch_norm": bool((summary or {}).get("has_batch_norm")),
        "residual": bool((summary or {}).get("has_residual_add")),
        "simple_rnn": "SimpleRNN" in recurrent,
        "recurrent": bool(recurrent),
        "depth": len(weighted),
        "main_class": main_class,
        "optimizer": (summary or {}).get("optimizer"),
        "negative_bias": negative_bias,
        "optimizer_clipping": (summary or {}).get("optimizer_clipping") or {},
    }


def remedies_for(kind, layer_names, summary, clipping=None):
    """Picks the remedies that fit a finding in this model.

    Args:
        kind: A finding kind (`detect.KINDS`).
        layer_names: The layers concerned.
        summary: The model summary, or None (generic remedies).
        clipping: How `keras_vg.AutoClip` fared during an exploding or
            non-finite finding: None where the run has no AutoClip
            (`clipping`: add it), `"armed"` where it was not on then
            (`clip_earlier`), `"loose"` where the updates still exploded
            with clipping on (`tighter_clipping`), `"bounded"` where it kept
            them bounded (nothing about clipping). Defaults to `None`.

    Returns:
        A list of `Remedy`, the most fitting first.

    Example:

    >>> summary = {"layers": [{"name": "rnn", "class": "SimpleRNN", "activation": None,
    ...            "kernel_initializer": "GlorotUniform"}], "recurrent": ["SimpleRNN"]}
    >>> [r.key for r in remedies_for("exploding", ["rnn"], summary)][:2]
    ['clipping', 'gating']
    """
    if clipping not in CLIPPING_REMEDIES and clipping != "bounded":
        raise ValueError(f"`clipping` must be None, 'armed', 'loose' or 'bounded'. Received: clipping={clipping!r}")
    f = _facts(layer_names, summary)
    generic = not f["known"]
    out = []
    add = lambda key, text: out.append(Remedy(key, text))  # noqa: E731

    def gating():
        if f["simple_rnn"] or generic:
            add("gating", "gated recurrent layers (LSTM or GRU) instead of SimpleRNN")

    def scaled_init():
        if f["unscaled_inits"]:
            add("scaled_init", f"an initialiser scaled to the layer's width instead of "
                               f"{', '.join(f['unscaled_inits'])}: he_normal for ReLU-family, "
                               f"glorot_uniform (Xavier) for sigmoid/tanh")

    def activation_and_init():
        scaled_init()  # first: a fixed-scale initialiser is the likelier cause
        if f["saturating"] or generic:
            add("relu_he", "ReLU-family activations (ReLU, ELU, SELU, Swish) with He initialisation "
                           "(he_normal; lecun_normal for SELU)")
        elif f["relu_family"] and not f["he"]:
            add("he_init", "He initialisation (kernel_initializer=\"he_normal\") for the ReLU-family layers")

    def batch_norm(where="after each"):
        if not f["batch_norm"] and (not f["recurrent"] or generic):
            add("batch_norm", f"BatchNormalization {where} {f['main_class']}")

    def residual():
        if not f["residual"] and not f["recurrent"] and (f["depth"] >= 4 or generic):
            add("residual", "residual (skip) connections around blocks of layers (keras.layers.Add)")

    def fewer_layers():
        if f["depth"] >= 8 or generic:
            detail = f" (this model has {f['depth']} weighted layers)" if f["known"] else ""
            add("fewer_layers", f"fewer layers{detail}")

    def clip():
        if clipping is None and f["optimizer_clipping"]:  # the gradients recorded are before its clipping
            settings = ", ".join(f"{k}={v:g}" for k, v in f["optimizer_clipping"].items())
            add("tighter_clipping", f"a lower clipping threshold than the optimizer's {settings} (the gradients "
                                    "here are before it), or keras_vg.AutoClip(), which clips relative to the "
                                    "run's own norms")
        elif clipping in CLIPPING_REMEDIES:
            add(*CLIPPING_REMEDIES[clipping])

    def lower_lr(why=""):
        optimizer = f" for {f['optimizer']}" if f["optimizer"] else ""
        add("lower_lr", f"a lower learning rate{optimizer}{why}")

    if kind in ("vanishing", "stalled"):
        gating()
        activation_and_init()
        batch_norm()
        residual()
        fewer_layers()
        if kind == "stalled" and f["optimizer"] in (None, "SGD"):
            add("adaptive_optimizer", "an adaptive optimizer (Adam, RMSprop), whose step does not "
                                      "shrink with the gradient")
    elif kind == "exploding":
        clip()
        gating()
        lower_lr()
        if f["unscaled_inits"]:
            activation_and_init()
        batch_norm()
    elif kind == "nonfinite":
        clip()
        gating()  # in a SimpleRNN, non-finite values are most often an explosion through time
        lower_lr()
        if f["unscaled_inits"]:  # non-finite values are often an explosion's end
            activation_and_init()
        add("check_data", "check the inputs and the loss for NaN/inf (log of 0, division by 0); "
                          "keras.callbacks.TerminateOnNaN stops such a run at once")
    elif kind == "dead":
        if f["negative_bias"]:  # the likelier cause: the units start below 0
            add("bias_init", f"biases that start at 0 (bias_initializer=\"zeros\") instead of "
                             f"{f['negative_bias'][0]:g}, which starts the units off")
        lower_lr(": large steps push ReLU units' biases negative for good")
        scaled_init()  # too large an init blows activations up, and the large steps that follow kill units
        if f["plain_relu"] or generic:
            add("leaky", "LeakyReLU or ELU, which keep a gradient for negative inputs")
        if not f["he"]:
            add("he_init", "He initialisation (kernel_initializer=\"he_normal\")")
        batch_norm("before the activation of each")
    elif kind == "saturated" and f["output_only"]:
        add("output_layer", "none needed if predictions are meant to be confident: an output sigmoid or "
                            "softmax saturates as the loss falls; early in training, a lower learning rate")
    elif kind == "saturated":
        activation_and_init()
        batch_norm("before the activation of each")
        add("scale_inputs", "standardised inputs (zero mean, unit variance)")
    return out


# ---------------------------------------------------------------------------
# Report lines.


def _model_line(summary):
    if summary is None:
        return "Model: unknown"
    counts = {}
    for entry in summary.get("layers", []):
        if entry["class"] != "InputLayer":  # functional models list it; it is not a layer to fix
            counts[entry["class"]] = counts.get(entry["class"], 0) + 1
    layers = ", ".join(f"{cls} x{n}" for cls, n in counts.items())
    optimizer = f", optimizer {summary['optimizer']}" if summary.get("optimizer") else ""
    return f"Model: {summary.get('name', '?')} ({layers}){optimizer}"


def _switch(event):
    """`on at step 40 (global norm 2.3e+05, threshold 12)` or `off at step 80`."""
    if event["kind"] == "clip_off":
        return f"off at step {event['step']}"
    if "global_grad_norm" in event and event["global_grad_norm"] is None:
        return f"on at step {event['step']} (non-finite gradient)"
    figures = [f"{label} {event[key]:.2g}" for label, key in (("global norm", "global_grad_norm"),
                                                             ("threshold", "clip_threshold"))
               if event.get(key) is not None]
    return f"on at step {event['step']}" + (f" ({', '.join(figures)})" if figures else "")
