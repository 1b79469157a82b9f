"""Step-time overhead of GradientMonitor against plain `fit`, in one process.

The method is `benchmarks/interleaved.py`: every arm trains its own copy of
the model, rounds interleave the arms after a warm-up round, each arm is timed
from its third batch on, and its time is divided by plain `fit`'s in the same
round. The table gives the fastest-round ratio, the median paired ratio with
its quartiles and the CPU-time ratio, beside an A/A row (plain against plain)
that shows the noise floor of the machine.

Usage:
    python -u benchmarks/overhead.py              # all models, 9 rounds
    python benchmarks/overhead.py --models mlp --rounds 7 --batches 40
    python -u benchmarks/overhead.py --threads 1 --jit  # XLA; one thread steadies the CPU-time column
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_vg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import add_threads_option, hold_threads, print_table, time_arms  # noqa: E402


def sigmoid_mlp():
    layers = [keras.Input((256,))]
    layers += [keras.layers.Dense(256, activation="sigmoid") for _ in range(20)]
    layers.append(keras.layers.Dense(10))
    x = np.random.rand(128 * 64, 256).astype("float32")
    return keras.Sequential(layers), x, 128


def small_cnn():
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(16, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(10),
    ])
    return model, np.random.rand(64 * 64, 16, 16, 3).astype("float32"), 64


def small_transformer():
    inputs = keras.Input((32, 64))
    x = inputs
    for _ in range(2):
        attention = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16)(x, x)
        x = keras.layers.LayerNormalization()(x + attention)
        hidden = keras.layers.Dense(128, activation="relu")(x)
        x = keras.layers.LayerNormalization()(x + keras.layers.Dense(64)(hidden))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs), np.random.rand(64 * 64, 32, 64).astype("float32"), 64


MODELS = {"mlp": sigmoid_mlp, "cnn": small_cnn, "transformer": small_transformer}


class TapeRecompute(keras.callbacks.Callback):
    """The common approach: an eager GradientTape on a probe batch after every step."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def on_train_batch_end(self, batch, logs=None):
        with tf.GradientTape() as tape:
            loss = keras.losses.sparse_categorical_crossentropy(self.y, self.model(self.x), from_logits=True)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.norms = [float(tf.norm(g)) for g in grads if g is not None]


def make_arms(build, x, batch, log_root, jit_compile):
    y = np.random.randint(0, 10, size=len(x))
    # One set of callbacks per arm for all rounds, as in one long fit: a monitor keeps its
    # traced function across fit calls, so only the warm-up round traces.
    arms = {
        "plain": [],
        "plain (A/A)": [],
        "GradientMonitor every=1": [keras_vg.GradientMonitor(f"{log_root}/every1", verbose=0)],
        "GradientMonitor every=10": [keras_vg.GradientMonitor(f"{log_root}/every10", every=10, verbose=0)],
        "eager GradientTape recompute": [TapeRecompute(x[:batch], y[:batch])],
        "TensorBoard(histogram_freq=1)": [keras.callbacks.TensorBoard(f"{log_root}/tb", histogram_freq=1)],
    }
    models = {}
    for name in arms:
        keras.utils.set_random_seed(0)
        model, _, _ = build()
        model.compile(optimizer=keras.optimizers.Adam(1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
        models[name] = model
    return arms, models, y


def run_model(name, rounds, batches, jit_compile=False):
    build = MODELS[name]
    keras.utils.set_random_seed(0)
    _, x, batch = build()
    x = x[: batch * batches]
    with tempfile.TemporaryDirectory() as log_root:
        arms, models, y = make_arms(build, x, batch, log_root, jit_compile)
        wall, cpu = time_arms(models, arms, lambda model, callbacks: model.fit(
            x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks), rounds)
        event_bytes = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{log_root}/every1") for f in fs
        )
        recorded = (rounds + 1) * batches
    xla = ", jit_compile=True" if jit_compile else ""
    print_table(f"{name}{xla}: batch {batch}, {batches} batches/round, {rounds} rounds", wall, cpu, batches - 3)
    print(f"event-file bytes per recorded step (every=1): {event_bytes / recorded:.0f}")
    return wall


def tap_state_bytes(name):
    """Bytes of the tap's buffers for one model (its extra device memory, besides w_before copies)."""
    keras.utils.set_random_seed(0)
    model, x, batch = MODELS[name]()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with tempfile.TemporaryDirectory() as log_dir:
        monitor = keras_vg.GradientMonitor(log_dir, verbose=0)
        model.fit(x[:batch * 2], np.zeros(batch * 2), batch_size=batch, epochs=1, verbose=0, callbacks=[monitor])
        state = sum(int(np.prod(v.shape)) * v.dtype.size for v in monitor.tap.buffers.variables.values())
        observed = monitor.tap._update_meter.observed
        copied = sum(int(np.prod(v.shape)) * 4 for v, seen in zip(model.trainable_variables, observed) if not seen)
    print(f"{name}: tap buffers {state} bytes; weight copies for update_ratio {copied} bytes "
          f"(transient, one step; 0 where the optimizer's updates are observed)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=30)
    add_threads_option(parser)
    parser.add_argument("--jit", action="store_true", help="Compile every arm with jit_compile=True (XLA).")
    args = parser.parse_args()
    hold_threads(args.threads)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}")
    for name in args.models:
        run_model(name, args.rounds, args.batches, args.jit)
    for name in args.models:
        tap_state_bytes(name)


if __name__ == "__main__":
    main()
