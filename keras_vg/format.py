"""The keras-vg event format: the one contract between writer and readers.

Everything a writer puts into an event file and everything a reader (the
`keras_vg.reader` module, the TensorBoard plugin) expects is defined here, and
nowhere else. This module imports neither TensorFlow nor TensorBoard, so the
TensorBoard plugin can import it at start-up for free.

See `docs/FORMAT.md` for the human-readable description.

| statistic             | axis     | meaning                                         |
|-----------------------|----------|-------------------------------------------------|
| `grad_norm`           | variable | L2 norm of the gradient                         |
| `grad_max_abs`        | variable | largest absolute gradient value                 |
| `grad_nonfinite`      | variable | NaN/inf count of the recorded step's gradient   |
| `weight_norm`         | variable | L2 norm of the variable before the update       |
| `update_ratio`        | variable | ‖w_after − w_before‖ / ‖w_before‖ (NaN: undefined) |
| `dead_fraction`       | layer    | fraction of units that passed no gradient on the step's batch |
| `saturation_fraction` | layer    | fraction of the step's activations near an asymptote |
| `global_grad_norm`    | scalar   | L2 norm over all gradients, before clipping     |
| `global_grad_norm_clipped` | scalar | L2 norm over all gradients, after AutoClip    |
| `clip_threshold`      | scalar   | AutoClip's threshold on the global norm (NaN: none) |
| `clipped`             | scalar   | steps AutoClip clipped since the last record    |
| `skipped`             | scalar   | non-finite steps skipped since the last record  |
"""

import json

PLUGIN_NAME = "keras_vg"
"""Plugin name in `SummaryMetadata.plugin_data` (TensorBoard wants `[A-Za-z0-9_-]+`)."""

FORMAT_VERSION = "2.0"
"""`major.minor`. Readers accept any minor of their own major, and refuse newer majors."""

AXIS_VARIABLE = "variable"
AXIS_LAYER = "layer"
AXIS_SCALAR = "scalar"
AXIS_JSON = "json"

STAT_AXES = {
    "grad_norm": AXIS_VARIABLE,
    "grad_max_abs": AXIS_VARIABLE,
    "grad_nonfinite": AXIS_VARIABLE,
    "weight_norm": AXIS_VARIABLE,
    "update_ratio": AXIS_VARIABLE,
    "dead_fraction": AXIS_LAYER,
    "saturation_fraction": AXIS_LAYER,
    "global_grad_norm": AXIS_SCALAR,
    # 1.1: written by AutoClip (keras_vg.clipping).
    "global_grad_norm_clipped": AXIS_SCALAR,
    "clip_threshold": AXIS_SCALAR,
    "clipped": AXIS_SCALAR,
    "skipped": AXIS_SCALAR,
}
"""Every statistic, in display order, with the axis its tensor runs along."""

STATS = tuple(STAT_AXES)
GRADIENT_STATS = ("grad_norm", "grad_max_abs", "grad_nonfinite", "global_grad_norm")
WEIGHT_STATS = ("weight_norm", "update_ratio")
ACTIVATION_STATS = ("dead_fraction", "saturation_fraction")
CLIP_STATS = ("global_grad_norm_clipped", "clip_threshold", "clipped", "skipped")
"""Statistics recorded by AutoClip, not by the GradientMonitor's tap (format 1.1)."""
MONITOR_STATS = tuple(s for s in STATS if s not in CLIP_STATS)
"""The statistics `GradientMonitor(stats=...)` can record."""

EVENTS_NAME = "events"
"""JSON list of events (alerts, clipping on/off, skipped steps) recorded at a step."""

MODEL_NAME = "model"
"""JSON summary of the model's layers, written once per training run."""

SCALARS_GLOBAL_NORM_TAG = "gradients/global_norm"
"""A plain scalar copy of `global_grad_norm`, for TensorBoard's stock Scalars tab."""

SCALARS_GLOBAL_NORM_CLIPPED_TAG = "gradients/global_norm_clipped"
"""A plain scalar copy of `global_grad_norm_clipped` (format 1.1)."""

EVENT_KINDS = ("alert", "clip_on", "clip_off", "skip", "warning", "nonfinite")


class FormatError(ValueError):
    """Raised when data is not keras-vg data, or is of a format this version cannot read."""


def tag_for(name):
    """Returns the event-file tag of a statistic, `events` or `model`.

    Args:
        name: A name from `STATS`, `EVENTS_NAME` or `MODEL_NAME`.

    Returns:
        The tag string, e.g. `"keras_vg/grad_norm"`.

    Example:

    >>> tag_for("grad_norm")
    'keras_vg/grad_norm'
    """
    if name not in STAT_AXES and name not in (EVENTS_NAME, MODEL_NAME):
        raise ValueError(
            f"Unknown keras-vg name. Expected one of {list(STATS) + [EVENTS_NAME, MODEL_NAME]}. "
            f"Received: name={name!r}"
        )
    return f"{PLUGIN_NAME}/{name}"


def name_for(tag):
    """Inverse of `tag_for`: the statistic name of a tag, or None if the tag is not ours."""
    prefix = PLUGIN_NAME + "/"
    if not tag.startswith(prefix):
        return None
    name = tag[len(prefix):]
    if name in STAT_AXES or name in (EVENTS_NAME, MODEL_NAME):
        return name
    return None


def axis_of(name):
    """Returns the axis of a statistic (`variable`, `layer`, `scalar`), or `json`."""
    return STAT_AXES.get(name, AXIS_JSON)


def encode_metadata(name, names=None):
    """Builds the plugin-data content for a tag's first event.

    Args:
        name: The statistic name (or `EVENTS_NAME`, `MODEL_NAME`).
        names: For per-variable and per-layer statistics, the list of
            variable paths or layer names the tensor's entries belong to,
            in model order. Must be None for the other kinds.

    Returns:
        UTF-8 JSON bytes, to put in `SummaryMetadata.plugin_data.content`.

    Example:

    >>> decode_metadata(encode_metadata("grad_norm", ["dense/kernel"]))["names"]
    ['dense/kernel']
    """
    axis = axis_of(name)
    content = {"format_version": FORMAT_VERSION, "name": name, "axis": axis}
    if axis in (AXIS_VARIABLE, AXIS_LAYER):
        if names is None:
            raise ValueError(f"`names` is required for the per-{axis} statistic {name!r}.")
        content["names"] = [str(n) for n in names]
    elif names is not None:
        raise ValueError(f"`names` must be None for {name!r}. Received: names={names!r}")
    return json.dumps(content, sort_keys=True).encode("utf-8")


def decode_metadata(content):
    """Parses plugin-data content written by `encode_metadata`.

    Args:
        content: The bytes from `SummaryMetadata.plugin_data.content`.

    Returns:
        A dict with `format_version`, `name`, `axis` and, per variable or
        layer, `names`.

    Raises:
        FormatError: if the content is not keras-vg metadata, or was written
            in a newer major format version than this one reads.
    """
    try:
        content = json.loads(content.decode("utf-8") if isinstance(content, bytes) else content)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"keras-vg metadata is not valid JSON: {error}") from None
    if not isinstance(content, dict) or "format_version" not in content:
        raise FormatError("keras-vg metadata has no `format_version`.")
    check_version(content["format_version"])
    return content


def check_version(version):
    """Raises `FormatError` if `version` has a major this module cannot read."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"Malformed keras-vg format version: {version!r}") from None
    own_major = int(FORMAT_VERSION.split(".")[0])
    if major > own_major:
        raise FormatError(
            f"This data was written in keras-vg format {version}, newer than the "
            f"format {FORMAT_VERSION} this keras-vg reads. Upgrade keras-vg "
            "(pip install -U keras-vg) to read it."
        )
    if major < 1:
        raise FormatError(f"Unknown keras-vg format version: {version!r}")


def merge_names(lists):
    """Merges lists of variable or layer names, keeping the model order of each.

    A run whose variables changed between two `fit` calls (layers unfrozen,
    or frozen) holds several lists; readers show their union. A name new to
    the merge goes just before the next name it precedes in its own list, or
    at the end.

    Args:
        lists: Lists of names, oldest first.

    Returns:
        One list of names.

    Example:

    >>> merge_names([["a", "c"], ["a", "b", "c", "d"]])
    ['a', 'b', 'c', 'd']
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
                known.add(name)
        merged += pending
    return merged


def encode_json(value):
    """Encodes an events list or the model summary as compact UTF-8 JSON bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_json(data):
    """Decodes bytes written by `encode_json`."""
    return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
