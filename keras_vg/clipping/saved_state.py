"""AutoClip's saved state: two variables (every float, every integer) holding its statistics, on/off and counts.

On TensorFlow the state is a layer attached to the model (`STATE_ATTRIBUTE`),
outside its layer tracker; on JAX it is a metric attached there
(`jax_step.JaxClipState`), so that Keras threads its variables through the
stateless train step. Either way
every Keras way of saving weights carries it (docs/CLIPPING.md,
"Checkpoints"), one entry per name.
"""

import warnings

import keras
import numpy as np
from keras import ops

STATE_ATTRIBUTE = "_keras_vg_autoclip_state"
"""The model attribute holding the checkpointed state (also its path in weight files)."""


def config_key(policy):
    """What of a policy's configuration its saved statistics depend on.

    Args:
        policy: A `keras_vg.ClipPolicy`, or None.

    Returns:
        A hashable key (the class name and the sorted config), or None.

    Example:

    >>> from keras_vg.clipping.global_norm import GlobalNorm
    >>> config_key(GlobalNorm(1.0))[0], config_key(None)
    ('GlobalNorm', None)
    """
    return (type(policy).__name__, tuple(sorted(policy.get_config().items()))) if policy is not None else None


class PackedState:
    """What both backends' states share: the packing of named values into two vectors, and saving.

    Held in two variables (every float, every integer), not one per entry:
    a train step reads and writes each variable once, and on a small model
    each variable op is a visible part of the step (docs/PERFORMANCE.md).
    Weight files keep one entry per name.
    """

    def _lay_out(self, key, initial, integer):
        self.key = key
        self.names = list(initial)
        self._shapes = {name: np.shape(value) for name, value in initial.items()}
        self._kinds = {"float32": np.float32, integer: np.dtype(integer).type}
        # Scalars first, each kind in name order: one unstack reads them all.
        self._order = {
            kind: sorted((n for n in self.names if np.asarray(initial[n]).dtype.kind == np.dtype(kind).kind),
                         key=lambda n: (self._shapes[n] != (), n))
            for kind in self._kinds
        }

    def _pack_numpy(self, values, kind):
        return np.concatenate([np.asarray(values[n], kind).reshape(-1) for n in self._order[kind]] or
                              [np.zeros([0], kind)])

    def numpy(self):
        """The state as a dict of numpy values."""
        values = {}
        for kind, names in self._order.items():
            flat, offset = self._read_numpy(self.packed[kind]), 0
            for name in names:
                size = int(np.prod(self._shapes[name]))
                values[name] = flat[offset: offset + size].reshape(self._shapes[name]).copy()
                offset += size
        return values

    def unpack(self, flat):
        """The state as a dict of tensors, from the packed vectors (`{kind: tensor}`), in the train step."""
        values = {}
        for kind, names in self._order.items():
            scalars = [n for n in names if self._shapes[n] == ()]
            if scalars:
                values.update(zip(scalars, ops.unstack(flat[kind][: len(scalars)])))
            vectors = [n for n in names if self._shapes[n] != ()]
            if vectors:
                ends = np.cumsum([int(np.prod(self._shapes[n])) for n in vectors])[:-1].tolist()
                pieces = ops.split(flat[kind][len(scalars):], ends) if ends else [flat[kind][len(scalars):]]
                values.update(zip(vectors, pieces))
        return values

    def pack(self, values):
        """The packed vectors (`{kind: tensor}`) of a dict of tensors, as `unpack` returns it."""
        packed = {}
        for kind, names in self._order.items():
            scalars = [ops.cast(values[n], kind) for n in names if self._shapes[n] == ()]
            vectors = [ops.cast(values[n], kind) for n in names if self._shapes[n] != ()]
            packed[kind] = ops.concatenate(([ops.stack(scalars)] if scalars else []) + vectors, 0)
        return packed

    def save_own_variables(self, store):
        for name, value in self.numpy().items():
            store[name] = value

    def load_own_variables(self, store):
        keys = set(store.keys())
        if not keys:
            return  # a checkpoint written without AutoClip: start afresh
        missing = [name for name in self.names if name not in keys]
        if missing:
            warnings.warn(
                f"The checkpoint's AutoClip state does not match this AutoClip's policy (missing {missing}); "
                "the clipping statistics start afresh.",
                stacklevel=2,
            )
            return
        values = {name: np.asarray(store[name]) for name in self.names}
        for kind, variable in self.packed.items():
            variable.assign(self._pack_numpy(values, kind))


class ClipState(PackedState, keras.layers.Layer):
    """The state saved with the model's weights, on TensorFlow: statistics, on/off, counts.

    Args:
        key: The configuration the state belongs to (`AutoClip` makes a new
            state where its key differs).
        initial: A dict from name to the initial numpy value (float32 or
            int64), as `ClipSwitch.init()` returns it.
        **kwargs: Passed to `keras.layers.Layer`.

    Example:

    ```python
    state = ClipState(key, switch.init(), name="keras_vg_autoclip")
    state.numpy()["active"]   # 0: armed
    ```
    """

    def __init__(self, key, initial, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self._lay_out(key, initial, "int64")
        from keras_vg.device_buffers import sync_on_read  # TensorFlow: only where AutoClip acts

        self.packed = {kind: sync_on_read(self._pack_numpy(initial, kind), f"keras_vg_autoclip_{kind}")
                       for kind in self._order}

    @staticmethod
    def _read_numpy(variable):
        return variable.numpy()

    def read(self):
        """The state as a dict of tensors, read in the train step."""
        return self.unpack({kind: variable.read_value() for kind, variable in self.packed.items()})

    def write(self, values):
        """Writes a dict of tensors (as `read` returns them) in the train step."""
        for kind, value in self.pack(values).items():
            self.packed[kind].assign(value)
