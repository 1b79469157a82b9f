"""What a tap is given and finds in the model before it records, on any backend."""

from keras_vg.layers import activation_layers


class TapSettings:
    """The settings both taps (`tap.Tap`, `jax_tap.JaxTap`) start from.

    Args:
        model: A Keras model compiled with a Keras optimizer, built or not.
        every: Steps whose `iterations` are multiples of `every` are recorded.
        capacity: Rows of the ring buffers: at least the number of recorded
            steps between two host reads.
        stats_to_record: Names from `keras_vg.format.MONITOR_STATS`.
        saturation_epsilon: Distance to an asymptote that counts as saturated.
        optimizer: The optimizer whose `apply` the tap observes (under mixed
            precision the one inside Keras's loss-scale optimizer).

    Example:

    >>> settings = TapSettings(model, 10, 40, ["grad_norm"], 0.01, model.optimizer)  # doctest: +SKIP
    >>> settings.dead_layers, settings.saturation_layers                              # doctest: +SKIP
    ([], [])
    """

    def __init__(self, model, every, capacity, stats_to_record, saturation_epsilon, optimizer):
        self.model = model
        self.every = int(every)
        self.capacity = int(capacity)
        self.stats_to_record = tuple(stats_to_record)
        self.saturation_epsilon = float(saturation_epsilon)
        self.optimizer = optimizer
        self.steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        # The activation layers whose dead units or saturation the chosen statistics need.
        self.dead_layers, self.saturation_layers = activation_layers(model, self.stats_to_record)
