"""The words of `keras_vg.detect`: an episode's data turned into a line for a person.

The rules return data (an `Episode`'s kind, names, steps, `rule`, `figure`
and `threshold`); this module alone words it: the kinds' titles, what each
rule's figure means, the place and the steps. The report
(`keras_vg.diagnosis`) builds its sentences from the same fields through
`KIND_TITLES` and `measured`, never from `Episode.message`.

Example:

>>> measured_text("vanishing", 1e-6, 1e-3)
'gradient norm down to 1e-06 of the largest among the layers above (threshold 0.001)'
>>> episode_message("dead", "layer dense", 3, 3, "dead", 0.8, 0.7)
'Dead units in layer dense, step 3: up to 80% of units passed no gradient for a whole batch (threshold 70%).'
"""

import numpy as np

from keras_vg.detect.rules import SKIPPED_STAT

KIND_TITLES = {
    "nonfinite": "Non-finite gradients",
    "exploding": "Exploding gradients",
    "vanishing": "Vanishing gradients",
    "dead": "Dead units",
    "saturated": "Saturated activations",
    "stalled": "Stalled updates",
    "skipped": "Steps skipped by AutoClip",
}
"""A title for each episode kind (`rules.KINDS`)."""

RULE_TEXTS = {
    "nonfinite": "up to {f:.0f} NaN/inf values in one gradient",
    "spike": "gradient norm up to {f:.3g}x its usual level (threshold {t:g}x)",
    "grad_norm": "gradient norm up to {f:.3g} (threshold {t:g})",
    "update_ratio": "one update changed the kernels by up to {f:.3g}x their norm (threshold {t:g})",
    "vanishing": "gradient norm down to {f:.2g} of the largest among the layers above (threshold {t:g})",
    "dead": "up to {f:.0%} of units passed no gradient for a whole batch (threshold {t:.0%})",
    "saturated": "up to {f:.0%} of activations at an asymptote (threshold {t:.0%})",
    "below_resolution": "update ratio down to {f:.2g}, below float32 resolution ({t:.2g}): "
                        "these kernels are not changing",
    "stalled": "update ratio down to {f:.2g} of the upper half's median (threshold {t:g}): "
               "these kernels barely change",
    "skipped": "{f:.0f} steps with a non-finite gradient were not applied",
}
"""What each rule (`rules.RULE_NAMES`) measured: its worst figure `f` against the threshold `t`."""


def measured_text(rule, figure, threshold):
    """A rule's figure against its threshold, in words.

    Args:
        rule: A rule name (`rules.RULE_NAMES`, not `""`).
        figure: What the rule measured (NaN: a non-finite norm without a
            `grad_nonfinite` count).
        threshold: The threshold it was compared with.

    Returns:
        A phrase without a capital or a full stop.
    """
    if np.isnan(figure):  # a non-finite norm without a `grad_nonfinite` count
        return "the gradient norm is not finite"
    return RULE_TEXTS[rule].format(f=figure, t=threshold)


def measured(episode):
    """What an episode measured, in words: its rule's figure against the threshold.

    The part of `Episode.message` after the place and the steps, built from
    the episode's `rule`, `figure` and `threshold`.

    Example:

    >>> from keras_vg.detect import classify, find_episodes
    >>> result = classify({"grad_norm": ([0, 1], ["a", "b"], [[1e-6, 1.0], [1e-6, 1.0]])})
    >>> measured(find_episodes(result)[0])
    'gradient norm down to 1e-06 of the largest among the layers above (threshold 0.001)'
    """
    return measured_text(episode.rule, episode.figure, episode.threshold)


def layer_words(layers):
    """`layer dense_3`, or `layers dense ... dense_4 (5 layers)`."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {layers[0]} ... {layers[-1]} ({len(layers)} layers)"


def where(scope, names, structure):
    """Words for the place of an episode's names: their layers, the global norm, or nothing (skipped steps).

    Args:
        scope: `"variable"`, `"layer"` or `"global"`.
        names: The episode's variables or layers, in model order.
        structure: The variables' `Structure` (used for the variable scope).
    """
    if scope == "variable":
        return layer_words(structure.layers_of(names))
    if scope == "layer":
        return layer_words(names)
    return "" if tuple(names) == (SKIPPED_STAT,) else "the global gradient norm"


def episode_message(kind, place, first_step, last_step, rule, figure, threshold):
    """`Episode.message`: one line for a person, from the episode's fields.

    Args:
        kind: The episode's kind.
        place: `where`'s words for its names ("" for none).
        first_step, last_step: Its steps.
        rule, figure, threshold: What it measured (`measured_text`).
    """
    when = (f"step {first_step}" if first_step == last_step
            else f"steps {first_step}-{last_step}")
    place = f" in {place}" if place else ""
    return f"{KIND_TITLES[kind]}{place}, {when}: {measured_text(rule, figure, threshold)}."


def summary(episodes, max_lines=20):
    """A short text of episodes, or "" if there are none (`StreamingDetector.summary`).

    Args:
        episodes: `Episode`s, in the order to list them.
        max_lines: Episodes listed before the rest are counted. Defaults
            to `20`.
    """
    if not episodes:
        return ""
    lines = [f"keras-vg found {len(episodes)} gradient-health episode(s):"]
    lines += [f"  - {e.message}" for e in episodes[:max_lines]]
    if len(episodes) > max_lines:
        lines.append(f"  ... and {len(episodes) - max_lines} more.")
    return "\n".join(lines)
