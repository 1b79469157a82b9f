"""Layer rows for the Gradients tab: a per-variable series combined per layer. numpy only.

The maths is `keras_vg.layer_stats`', the one place it lives (`Run.stat(name,
by="layer")` uses it too): norms combine as the root of the sum of squares,
maxima as the max, non-finite counts as the sum, and update ratios as ‖Δw‖/‖w‖
over a layer's variables together, through their `weight_norm` at the same
steps. The layer of each variable is the one the model summaries the monitor
wrote (`keras_vg/model` records) name for it; here the plugin only supplies
what TensorBoard's data provider handed out.
"""

import numpy as np

from keras_vg import heatmap_marks, layer_stats


def combine(variables, weight_norm, summaries):
    """One statistic's values per layer, from its values per variable.

    Args:
        variables: The per-variable `tb_plugin.data.Series` (`values [N, T]`).
        weight_norm: The `weight_norm` `Series` of the same run, for
            `update_ratio`; None for the other statistics.
        summaries: The model summaries recorded in the run, oldest first:
            a variable belongs to the layer the first one naming it says
            (and otherwise to its path without the last part).

    Returns:
        `(layer_names, values, variable_layers)`: the `L` layers in the order
        their first variable comes, float32 `values [L, T]` on the variables'
        steps, and the layer of each of the `N` variables.

    Example:

    >>> names, values, owners = combine(grad_norm_series, None, [summary])   # doctest: +SKIP
    >>> names, owners                                                       # doctest: +SKIP
    (['dense', 'dense_1'], ['dense', 'dense', 'dense_1', 'dense_1'])
    """
    every_layer = [layer for summary in summaries if isinstance(summary, dict)
                   for layer in summary.get("layers", []) if isinstance(layer, dict) and "name" in layer]
    owners = layer_stats.variable_layers(variables.names, {"layers": every_layer})
    norms = None
    if weight_norm is not None:
        # Recorded together, so normally the same axes; TensorBoard's sampling may keep other steps.
        norms = heatmap_marks.reindex(weight_norm.values.T, weight_norm.steps, weight_norm.names,
                                      variables.steps, variables.names, fill=np.nan)
        # float64 already: `by_layer` converts it per layer otherwise (24 s instead of 2 s at 1,000 x 20,000).
        norms = np.asarray(norms, dtype=np.float64)
    names, values = layer_stats.by_layer(variables.name, owners, variables.values.T, norms)
    return names, np.ascontiguousarray(values.T), owners
