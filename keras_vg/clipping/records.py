"""AutoClip's records and events: the device buffers the step writes, and the host's reads into a run.

Each step writes its row (on record steps) and its events into
`keras_vg.device_buffers` rings; the host reads what is new every 32 steps
(or second) and at each epoch's end, prints the events, and writes both
into the model's `GradientMonitor` run (`RunLog`) or into AutoClip's own
`log_dir`.
"""

import math
import sys
import warnings

import keras
import numpy as np
from keras import ops

from keras_vg import _keras_compat
from keras_vg import format as fmt
from keras_vg.clipping.dead_end import stop_event

RECORD_COLUMNS = ("global_grad_norm",) + fmt.CLIP_STATS
"""The columns of a per-step record, in buffer order."""

EVENT_CODES = {1: "clip_on", 2: "clip_off", 3: "skip"}
EVENT_CAPACITY = 256
"""Events kept on the device between two host reads."""

RECORD_CAPACITY = 1024
"""Records kept on the device between two host reads (plus one execution's worth): a
GradientMonitor with a larger `every` than AutoClip's reads them less often than AutoClip
writes them."""


def _json_number(value):
    value = float(value)
    return value if math.isfinite(value) else None


class ClipRecords:
    """AutoClip's device buffers and what the host reads from them and writes.

    Args:
        policy: The clipping policy (named in the `clip_on` message).
        cooldown: AutoClip's `cooldown` (named in the `clip_off` message).
        log_dir: AutoClip's own run directory, or None to write into the
            model's `GradientMonitor` run.
        every: Record every `every`-th optimizer step.

    Example:

    ```python
    records = ClipRecords(policy, cooldown=None, log_dir=None, every=1)
    records.allocate(model)                           # when the hooks are installed
    records.write_step(step, norm, norm_after, decision, clipped)   # in the step
    records.read_new()                                # on the host: [(step, values), ...]
    ```
    """

    def __init__(self, policy, cooldown, log_dir, every):
        self.policy, self.cooldown, self.log_dir, self.every = policy, cooldown, log_dir, every
        self.buffers = None
        self.model = None
        self.capacity = None
        self.writer = None  # for `log_dir`
        self.own_offset = None  # for `log_dir`: added to `iterations` (see `start_own_axis`)
        self.failed = False
        self._last_read_step = -1
        self._event_cursor = 0
        self._print_cursor = 0
        self._stops = []  # stops made on the host, not yet written

    def start_fit(self):
        """Forgets a previous fit's failure and step axis."""
        self.failed = False
        self.own_offset = None

    # On the device ---------------------------------------------------------------------

    def allocate(self, model):
        """Makes new buffers for `model` (in its distribution strategy), read from their start.

        On TensorFlow they are `keras_vg.device_buffers` variables; on JAX, the
        variables of a metric attached to the model, which Keras threads
        through its stateless step (there every float is float32 unless JAX
        runs in 64 bits: steps are exact up to 2**24).

        Args:
            model: The compiled model; its `steps_per_execution` sizes the
                record buffer.
        """
        from keras_vg.device_buffers import SPARE_ROWS

        steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        capacity = RECORD_CAPACITY + math.ceil(steps_per_execution / self.every) + 1
        # One spare row past each buffer's capacity: see `record_values`.
        initial = {
            # Column 0 is the step (-1: empty); float64 where the backend has it, so that a step is exact.
            "records": np.full([capacity + SPARE_ROWS, 1 + len(RECORD_COLUMNS)], -1.0),
            "events": np.zeros([EVENT_CAPACITY + SPARE_ROWS, 4]),
            # Clipped and skipped steps since the last record, and events in all.
            "counts": np.zeros([3]),
            # Measured on the host (`AutoClip._refresh_weight_norm`), read by the guard's SGD rules; 0 until
            # then, which gives them no scale (not NaN: JAX checks that every process puts the same initial
            # value, and NaN equals nothing).
            "weight_norm": np.float32(0.0),
        }
        if keras.backend.backend() == "tensorflow":
            from keras_vg.device_buffers import sync_on_read

            with model.distribute_strategy.scope():
                self.buffers = {name: sync_on_read(value, f"keras_vg_autoclip_{name}")
                                for name, value in initial.items()}
        else:
            from keras_vg.jax_tap import BuffersMetric

            specs = {name: (value.shape, "float32" if name == "weight_norm" else "float64", value)
                     for name, value in initial.items()}
            self.buffers = _keras_compat.attach_metric(
                model, "_keras_vg_autoclip_buffers", BuffersMetric("keras_vg_autoclip_buffers", specs)).buffers
        self.model = model
        self.capacity = capacity
        # New buffers, whose steps may start again from 0 (a recompile): read them from their start.
        self._last_read_step, self._event_cursor, self._print_cursor = -1, 0, 0

    def _read(self, name):
        """A buffer's value, as numpy (on JAX mid-epoch, from Keras's training state)."""
        return _keras_compat.read_variable(self.model, self.buffers[name])

    def write_step(self, step, norm, norm_after, decision, clipped):
        """Writes this step's row (on record steps) and its events into the device buffers (in the step)."""
        b = self.buffers
        names = ("records", "events", "counts")
        values = self.step_values({name: b[name].read_value() for name in names}, step, norm, norm_after, decision,
                                  clipped)
        for name in names:
            b[name].assign(values[name])

    def step_values(self, buffers, step, norm, norm_after, decision, clipped):
        """The record buffers' values after this step (`record_values`), from their values before it."""
        return record_values(
            buffers, step, ops.stack([norm, norm_after, decision.threshold]),
            ops.stack([clipped, decision.skipped, decision.switched_on, decision.switched_off]), self.every,
            self.capacity)

    # On the host -----------------------------------------------------------------------

    def read_new(self):
        """Reads the per-step records not read before (see `AutoClip.read_new`)."""
        if self.buffers is None:
            return []
        rows = self._read("records")[: self.capacity]  # not the spare row
        records = []
        for index in np.argsort(rows[:, 0]):
            step = int(rows[index, 0])
            if step < 0 or step <= self._last_read_step:
                continue
            records.append((step, {name: float(value) for name, value in zip(RECORD_COLUMNS, rows[index, 1:])}))
        if records:
            self._last_read_step = records[-1][0]
        return records

    def _events_since(self, cursor, offset=0):
        """Returns `(events, new_cursor)`: the events recorded since `cursor`, oldest first.

        Args:
            cursor: Events counted before (`_event_cursor` or `_print_cursor`).
            offset: Added to each step, in the event and its message (the
                run's step axis; 0 for the optimizer's own numbering).
        """
        if self.buffers is None:
            return [], cursor
        count = int(self._read("counts")[2])
        if count <= cursor:
            return [], count
        data = self._read("events")  # step, kind, norm, threshold
        events = []
        first = max(cursor, count - EVENT_CAPACITY)
        if first > cursor:
            events.append({"kind": "warning", "step": int(data[first % EVENT_CAPACITY, 0]) + offset,
                           "message": f"AutoClip: {first - cursor} clipping events were overwritten before "
                                      "they were read."})
        for index in range(first, count):
            step, kind, norm, threshold = data[index % EVENT_CAPACITY]
            events.append(self._event(int(step) + offset, EVENT_CODES[int(kind)], norm, threshold))
        return events, count

    def _event(self, step, kind, norm, threshold):
        if kind == "skip":
            message = (f"Step {step} skipped: its gradient is not finite (global norm {norm:.4g}). "
                       "Weights and optimizer slots are unchanged.")
        elif kind == "clip_on":
            why = f"global norm {norm:.4g} is a spike" if np.isfinite(norm) else "its gradient is not finite"
            message = (f"Gradients exploded at step {step}: {why}. Clipping is on ({self.policy!r}); this step's "
                       f"threshold was {threshold:.4g}.")
        else:
            message = f"Step {step}: {self.cooldown} calm steps; clipping is off (armed again)."
        return {"kind": kind, "step": step, "message": message,
                "global_grad_norm": _json_number(norm), "clip_threshold": _json_number(threshold)}

    def add_stop(self, reason, last_good, step):
        """Keeps a stop made on the host (see `dead_end.stop_event`) to write with the next events."""
        self._stops.append((reason, last_good, step))

    def drain_events(self, offset):
        """The events not returned before, the host's stops included, their steps shifted by `offset`."""
        events, self._event_cursor = self._events_since(self._event_cursor, offset)
        events += [stop_event(*stop, offset) for stop in self._stops]
        self._stops = []
        return sorted(events, key=lambda event: event["step"])

    def offset_now(self, run):
        """What the run written into adds to the optimizer's steps now (0 where none is known).

        Args:
            run: The model's `RunLog`, or None.
        """
        if self.log_dir is not None:
            return self.own_offset or 0
        if run is not None and run.is_open():
            return run.offset
        return 0

    def start_own_axis(self, optimizer):
        """For `log_dir`: continues its step axis after the last step recorded there (as `GradientMonitor`).

        Called at a fit's first batch, once `BackupAndRestore` (whatever its
        place among the callbacks) has restored the optimizer's count: a
        recompile restarts `iterations` at 0, but the steps of one `log_dir`
        only go forward.
        """
        from keras_vg.reader import latest_records

        try:
            if self.writer is not None:
                self.writer.flush()
            last_step, _ = latest_records(self.log_dir)
            iterations = int(_keras_compat.read_variable(self.model, optimizer.iterations))
            self.own_offset = 0 if last_step is None else max(0, last_step + 1 - iterations)
        except Exception as error:  # noqa: BLE001 - recording must not kill training; clipping goes on
            self.own_offset = 0
            warnings.warn(f"AutoClip could not read the steps recorded in {self.log_dir!r}: "
                          f"{type(error).__name__}: {error}. Its records start at the optimizer's step.",
                          stacklevel=2)

    def print_events(self, offset):
        """Prints the events not printed before to stderr, their steps shifted by `offset` (process 0 only)."""
        if self.buffers is None or self.failed or not _keras_compat.is_primary_process():
            return
        try:
            events, self._print_cursor = self._events_since(self._print_cursor, offset)
        except Exception as error:  # noqa: BLE001 - printing must not kill training
            self.failed = True
            warnings.warn(f"AutoClip stopped reporting after an error: {type(error).__name__}: {error}.",
                          stacklevel=3)
            return
        for event in events:
            print(f"keras-vg AutoClip: {event['message']}", file=sys.stderr)

    def read_and_write(self, run=None):
        """Reads the records and events not read before and writes them: into `log_dir`, or into `run`.

        Every process of a multi-process run holds the same global records: process 0 alone writes them.

        Args:
            run: The model's `RunLog`, open; None to write into `log_dir`.
        """
        if self.buffers is None or self.failed or not _keras_compat.is_primary_process():
            return
        try:
            if run is None:
                if self.writer is None:
                    from keras_vg.event_writer import EventWriter

                    self.writer = EventWriter(self.log_dir)  # created lazily: no event file when not needed
                writer, offset, with_global_norm = self.writer, self.own_offset or 0, True
            else:
                writer, offset, with_global_norm = run.writer, run.offset, run.with_global_norm
            records = [(step + offset, values) for step, values in self.read_new()]
            events = self.drain_events(offset)
            if run is not None:
                run.add_skipped([(step, values["skipped"]) for step, values in records])
            if records or events:
                write_records(writer, records, events, with_global_norm)
                writer.flush()
        except Exception as error:  # noqa: BLE001 - recording must not kill training; clipping goes on
            self.failed = True
            warnings.warn(
                f"AutoClip stopped recording after an error: {type(error).__name__}: {error}. "
                "Clipping goes on; records written so far are kept.",
                stacklevel=3,
            )

    def close(self):
        """Closes the `log_dir` writer, if one was opened."""
        if self.writer is not None:
            self.writer.close()


def record_values(buffers, step, norms, flags, every, capacity):
    """The record buffers after one step: its row (on record steps) and its events.

    The buffers are `keras_vg.device_buffers` rings, as the monitor's: a
    step that writes nothing writes into the spare row past the capacity, so
    that every step runs the same few ops (no select over a whole buffer, no
    branch).

    Args:
        buffers: A dict of the buffers' values (see `ClipRecords.allocate`).
        step: The step, int64.
        norms: `[norm, norm_after, threshold]`, float32.
        flags: `[clipped, skipped, switched_on, switched_off]`, bool.
        every: Record every `every`-th step.
        capacity: Rows of the record buffer (without the spare one).

    Returns:
        The dict of the buffers' new values.
    """
    from keras_vg.device_buffers import ring_slot, scatter_rows

    clipped, skipped, switched_on, switched_off = ops.unstack(flags)
    dtype = buffers["records"].dtype  # float64 on TensorFlow; float32 on JAX unless it runs in 64 bits
    norms = ops.cast(norms, dtype)
    at = ops.cast(step, dtype)
    is_record = ops.equal(step % every, 0)
    # Clipped and skipped steps since the previous record, this one included; then the event count.
    counts = buffers["counts"] + ops.cast(ops.stack([clipped, skipped, False]), dtype)
    row = ops.concatenate([ops.reshape(at, [1]), norms, counts[:2]], 0)
    slot = ring_slot(step // every, capacity, is_record)
    # At most two events a step: a switch (on or off) and a skip.
    switched = switched_on | switched_off
    count = ops.cast(counts[2], "int32")
    first = ring_slot(count, EVENT_CAPACITY, switched)
    second = ring_slot(count + ops.cast(switched, "int32"), EVENT_CAPACITY, skipped)
    kinds = ops.convert_to_tensor([1.0, 3.0], dtype) + ops.cast(ops.stack([~switched_on, False]), dtype)
    events = ops.concatenate([ops.full([2, 1], at), kinds[:, None], ops.tile(norms[None, 0::2], [2, 1])], 1)
    new_count = counts[2] + ops.cast(switched, dtype) + ops.cast(skipped, dtype)
    return {
        "records": scatter_rows(buffers["records"], slot, row[None]),
        "events": scatter_rows(buffers["events"], ops.stack([first, second]), events),
        "counts": ops.concatenate([ops.where(is_record, ops.zeros([2], dtype), counts[:2]),
                                   ops.reshape(new_count, [1])], 0),
    }


def write_records(writer, records, events, with_global_norm=True):
    """Writes AutoClip's records and events with an `EventWriter`.

    Args:
        writer: A `keras_vg.event_writer.EventWriter`.
        records: From `AutoClip.read_new()`.
        events: From `AutoClip.drain_events()`.
        with_global_norm: Also write the pre-clip `global_grad_norm` (a
            `GradientMonitor` writes its own). Defaults to `True`.
    """
    for step, values in records:
        names = (("global_grad_norm",) if with_global_norm else ()) + fmt.CLIP_STATS
        scalars = {fmt.SCALARS_GLOBAL_NORM_CLIPPED_TAG: values["global_grad_norm_clipped"]}
        if with_global_norm:
            scalars[fmt.SCALARS_GLOBAL_NORM_TAG] = values["global_grad_norm"]
        writer.write_record(step, {name: (values[name], None) for name in names}, scalars)
    by_step = {}
    for event in events:
        by_step.setdefault(event["step"], []).append(event)
    for step, batch in sorted(by_step.items()):
        writer.write_json(fmt.EVENTS_NAME, step, batch)
