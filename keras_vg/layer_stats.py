"""Per-layer statistics, combined from the per-variable records. numpy only.

Users think in layers; variables are what is recorded. A layer's value at a
step is derived from its variables' values at that step (docs/FORMAT.md):

| statistic | a layer's value |
|---|---|
| `grad_norm`, `weight_norm` | root of the sum of the squares of its variables' norms: the norm of all its values |
| `grad_max_abs` | the largest of its variables' |
| `grad_nonfinite` | the sum of its variables' counts |
| `update_ratio` | ‖Δw‖ / ‖w‖ of all its variables together: √Σ(r‖w‖)² / √Σ‖w‖² from each one's r and ‖w‖ |

A variable whose value is NaN at a step (not recorded, or an undefined ratio)
is left out of its layer's value there; a layer none of whose variables has a
value reads NaN.

Example:

>>> layers = variable_layers(["d/kernel", "d/bias"], {"layers": [{"name": "d", "variables": ["d/kernel", "d/bias"]}]})
>>> names, values = by_layer("grad_norm", layers, np.array([[3.0, 4.0]]))
>>> names, values.tolist()
(['d'], [[5.0]])
"""

import numpy as np

COMBINED = ("grad_norm", "weight_norm", "grad_max_abs", "grad_nonfinite", "update_ratio")
"""The per-variable statistics that combine into per-layer ones."""


def variable_layers(names, summary):
    """Returns the layer each variable belongs to, by the model summary the monitor writes.

    Args:
        names: Variable paths.
        summary: The model summary (`Run.model()`), or None.

    Returns:
        A list with one layer name per variable. A variable the summary does
        not name (or without a summary) belongs to the layer named by its
        path without the last part (`"model/dense/kernel"` -> `"model/dense"`).
    """
    owner = {}
    for layer in (summary or {}).get("layers", []):
        for path in layer.get("variables", []):
            owner.setdefault(path, layer["name"])
    return [owner.get(name, str(name).rsplit("/", 1)[0]) for name in names]


def by_layer(stat, layers, values, weight_norm=None):
    """Combines a per-variable statistic into one value per layer and step.

    Args:
        stat: A name from `COMBINED`.
        layers: The layer of each variable, `variable_layers`'s list (`N`).
        values: float `[T, N]`, the statistic per step and variable.
        weight_norm: float `[T, N]`, the variables' `weight_norm` at the same
            steps; needed for `update_ratio` only.

    Returns:
        `(layer_names, layer_values)`: the `L` layers in the order their
        first variable comes, and a float32 array `[T, L]`.

    Raises:
        ValueError: for a statistic that does not combine, or an
            `update_ratio` without `weight_norm`.
    """
    if stat not in COMBINED:
        raise ValueError(f"`stat` must be one of {list(COMBINED)} to combine by layer. Received: stat={stat!r}")
    if stat == "update_ratio" and weight_norm is None:
        raise ValueError("`update_ratio` combines by layer through the variables' norms: pass `weight_norm`.")
    values = np.asarray(values, np.float64)
    names = list(dict.fromkeys(layers))
    column_layer = np.array([names.index(layer) for layer in layers], dtype=np.intp)
    out = np.full((values.shape[0], len(names)), np.nan)
    for index in range(len(names)):
        columns = values[:, column_layer == index]
        present = ~np.isnan(columns)
        any_present = present.any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if stat in ("grad_norm", "weight_norm"):
                combined = _root_sum_squares(columns)
            elif stat == "grad_max_abs":
                combined = np.fmax.reduce(columns, axis=1)
            elif stat == "grad_nonfinite":
                combined = np.nansum(columns, axis=1)
            else:
                norms = np.asarray(weight_norm, np.float64)[:, column_layer == index]
                norms = np.where(present, norms, np.nan)
                combined = _root_sum_squares(columns * norms) / _root_sum_squares(norms)
        out[:, index] = np.where(any_present, combined, np.nan)
    return names, out.astype(np.float32)


def _root_sum_squares(columns):
    """√Σx² of each row over its non-NaN entries, without overflow for huge values (inf stays inf)."""
    scale = np.fmax.reduce(np.abs(columns), axis=1, keepdims=True)
    safe = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)
    total = safe[:, 0] * np.sqrt(np.nansum((columns / safe) ** 2, axis=1))
    return np.where(np.isinf(scale[:, 0]), np.inf, total)
