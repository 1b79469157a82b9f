"""Ring buffers on the device: written in the train step, read by the host in batches.

One implementation for `keras_vg.tap.Tap` (the monitor's records, laid out by
`keras_vg.record_buffers`) and `keras_vg.clipping.AutoClip` (its records and
events). `ring_slot` and `scatter_rows` are `keras.ops` (AutoClip's records
use them on JAX too, in variables of a metric); the variables made here are
TensorFlow's. On TensorFlow each buffer is a SyncOnRead variable (under a `tf.distribute`
strategy each replica writes its own copy, and the host reads the first's:
every replica writes the same, already all-reduced values) with **one spare
row past its capacity**: a step that records nothing writes its row there,
so that every step runs the same few ops, one scatter of one row, with no
select over the whole buffer and no conditional.

Example:

>>> import tensorflow as tf
>>> buffer = sync_on_read(tf.zeros([2 + SPARE_ROWS, 3]), "example")
>>> for step in range(3):
...     write_row(buffer, tf.fill([3], float(step)), ring_slot(tf.constant(step), 2, tf.constant(step != 1)))
>>> buffer.numpy().tolist()   # step 1 recorded nothing: its row went to the spare row
[[2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
"""

from keras import ops

SPARE_ROWS = 1
"""Rows past a ring buffer's capacity: where a step that records nothing writes."""


def sync_on_read(initial, name, lift=True):
    """Makes a device buffer: a SyncOnRead variable holding `initial`.

    Args:
        initial: The initial value, a tensor or numpy array: for a ring
            buffer, `capacity + SPARE_ROWS` rows; a counter or a state
            vector may have any shape.
        name: The variable's name.
        lift: False for a buffer made during the first trace of a model
            built by it: a variable that `tf.function` captures as created
            in the trace would make it trace the step a second time.
            Defaults to `True`.

    Returns:
        A non-trainable `tf.Variable`.
    """
    import tensorflow as tf

    return tf.Variable(
        initial, trainable=False, name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        experimental_enable_variable_lifting=lift,
    )


def ring_slot(index, capacity, is_record=None):
    """The row a step writes: `index % capacity` where it records, else the spare row.

    Args:
        index: An integer scalar tensor (records written so far, or a step
            number divided by the cadence).
        capacity: The buffer's rows without the spare one.
        is_record: A bool scalar tensor, or None when every step records.

    Returns:
        An integer scalar tensor of `index`'s dtype.
    """
    slot = index % capacity
    return slot if is_record is None else ops.where(is_record, slot, ops.cast(capacity, slot.dtype))


def scatter_rows(value, slots, rows):
    """A ring buffer's value with `rows[i]` in row `slots[i]`: one scatter, a pure function.

    Args:
        value: The buffer's value, `[capacity + SPARE_ROWS, ...]`.
        slots: An integer tensor `[k]` (from `ring_slot`).
        rows: A tensor `[k, ...]` of the buffer's row shape.

    Returns:
        The new value.
    """
    slots = ops.reshape(ops.cast(slots, "int32"), [-1, 1])
    return ops.scatter_update(value, slots, ops.cast(rows, value.dtype))


def write_row(buffer, row, slot):
    """Writes one row into row `slot` of a ring buffer.

    SyncOnRead variables have no scatter of their own in a replica context:
    the new value is the old one with the row replaced, assigned whole.

    Args:
        buffer: A variable from `sync_on_read`.
        row: A tensor of the buffer's row shape.
        slot: An integer scalar tensor (`ring_slot`).
    """
    row = ops.convert_to_tensor(row, buffer.dtype)
    buffer.assign(scatter_rows(buffer.read_value(), slot, row[None]))
