"""What a record holds and how the host reads records back: the same for every backend.

A tap (`keras_vg.tap` on TensorFlow, `keras_vg.jax_tap` on JAX) writes each
record step as one row of a few ring buffers on the device, and the host reads
them in batches. This module says which buffers there are, their shapes, and
how a row turns into the `(step, values)` records the monitor writes; the
taps only make the buffers and write rows in their own backend's ops. numpy
only.

| buffer | shape | one row |
|---|---|---|
| `steps` | `[capacity]` int64 | the optimizer's `iterations` at the record |
| `count` | `[]` int64 | records written so far (the next row is `count % capacity`) |
| `gradients` | `[capacity, G, N]` | `GRADIENT_ROWS` asked for, per variable |
| `global_grad_norm` | `[capacity]` | the global gradient norm |
| `weights` | `[capacity, 2, N]` | `WEIGHT_ROWS`, per variable |
| `layers` | `[capacity, D + S]` | dead fractions of D layers, then saturation fractions of S layers |
| `loss_finite` | `[capacity]` | 1 while the loss tracker's total is finite this epoch, else 0 |

Example:

>>> buffers = RecordBuffers(["grad_norm"], ["d/kernel"], [], [], capacity=4, with_loss=False)
>>> sorted(buffers.specs())
['count', 'gradients', 'steps']
"""

import warnings

from keras_vg import format as fmt

GRADIENT_ROWS = ("grad_norm", "grad_max_abs", "grad_nonfinite")
"""The per-variable gradient statistics, in the order of the `gradients` buffer's rows."""

WEIGHT_ROWS = ("weight_norm", "update_ratio")
"""The per-variable weight statistics, in the order of the `weights` buffer's rows."""


class RecordBuffers:
    """The buffers of one tap and the records read from them.

    Args:
        stats_to_record: Names from `keras_vg.format.MONITOR_STATS`.
        variable_names: The paths of the `N` variables recorded, in order.
        dead_layer_names: The layers whose `dead_fraction` is recorded.
        saturation_layer_names: The layers whose `saturation_fraction` is.
        capacity: Rows of each ring buffer.
        with_loss: Whether rows note the loss tracker's finiteness.
    """

    def __init__(self, stats_to_record, variable_names, dead_layer_names, saturation_layer_names, capacity,
                 with_loss):
        wanted = set(stats_to_record)
        self.stats_to_record = tuple(stats_to_record)
        self.variable_names = list(variable_names)
        self.dead_layer_names = list(dead_layer_names)
        self.saturation_layer_names = list(saturation_layer_names)
        self.capacity = int(capacity)
        self.gradient_rows = tuple(s for s in GRADIENT_ROWS if s in wanted)
        self.records_global_norm = "global_grad_norm" in wanted
        self.records_weights = bool(wanted & set(WEIGHT_ROWS))
        self.with_loss = bool(with_loss)
        self._read_count = 0
        self._warned_lost = False

    def specs(self):
        """Returns the buffers to make: a dict from key to `(shape, dtype name, initial value)`."""
        capacity, n = self.capacity, len(self.variable_names)
        layers = len(self.dead_layer_names) + len(self.saturation_layer_names)
        specs = {"steps": ([capacity], "int64", -1), "count": ([], "int64", 0)}
        if self.gradient_rows:
            specs["gradients"] = ([capacity, len(self.gradient_rows), n], "float32", 0.0)
        if self.records_global_norm:
            specs["global_grad_norm"] = ([capacity], "float32", 0.0)
        if self.records_weights:
            specs["weights"] = ([capacity, len(WEIGHT_ROWS), n], "float32", 0.0)
        if layers:
            specs["layers"] = ([capacity, layers], "float32", 0.0)
        if self.with_loss:
            specs["loss_finite"] = ([capacity], "float32", 1.0)
        return specs

    def read(self, arrays):
        """Returns the records written since the last read.

        Args:
            arrays: A dict from buffer key to its current numpy value.

        Returns:
            A list of `(step, values)` in the order they were recorded,
            `values` a dict from statistic name to a numpy vector (a float for
            `global_grad_norm` and `loss_finite`). Steps are the optimizer's
            `iterations`.
        """
        count = int(arrays["count"])
        first = max(self._read_count, count - self.capacity)
        if first > self._read_count and not self._warned_lost:
            self._warned_lost = True
            warnings.warn(f"GradientMonitor lost {first - self._read_count} records that were overwritten "
                          "before they were read.", stacklevel=3)
        self._read_count = count
        return [self._record(arrays, index % self.capacity) for index in range(first, count)]

    def _record(self, arrays, row):
        values = {}
        for i, name in enumerate(self.gradient_rows):
            values[name] = arrays["gradients"][row, i]
        if self.records_global_norm:
            values["global_grad_norm"] = float(arrays["global_grad_norm"][row])
        for i, name in enumerate(WEIGHT_ROWS):
            if name in self.stats_to_record:
                values[name] = arrays["weights"][row, i]
        if self.with_loss:
            values["loss_finite"] = float(arrays["loss_finite"][row])
        if "layers" in arrays:
            layer_values = arrays["layers"][row]
            dead = len(self.dead_layer_names)
            if dead:
                values["dead_fraction"] = layer_values[:dead]
            if self.saturation_layer_names:
                values["saturation_fraction"] = layer_values[dead:]
        return int(arrays["steps"][row]), values

    def names_for(self, name):
        """Returns the names a statistic's vector runs along (variable paths or layer names)."""
        if fmt.axis_of(name) == fmt.AXIS_VARIABLE:
            return self.variable_names
        if name == "dead_fraction":
            return self.dead_layer_names
        if name == "saturation_fraction":
            return self.saturation_layer_names
        return None

