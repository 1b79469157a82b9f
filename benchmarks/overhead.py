"""Step-time, trace-time and memory overhead of GradientMonitor (and AutoClip) against plain `fit`.

The step-time method is `benchmarks/interleaved.py`: every arm trains its
own copy of the model, rounds interleave the arms after a warm-up round, each
arm is timed from its third batch on with a batch-begin timer, and its time is
divided by plain `fit`'s in the same round. The table gives the fastest-round
ratio, the median paired ratio with its quartiles and the CPU-time ratio,
beside an A/A row (plain against plain) that shows the noise floor of the
machine. It also gives each arm's warm-up round (the first `fit`, which
traces) minus plain's: the extra trace and compile time.

`--memory` instead runs each arm alone in a fresh process on a wide ReLU MLP
and reports its peak resident memory above plain's, as a multiple of the
parameters' size.

Keras's backend is `KERAS_BACKEND`'s (TensorFlow by default; `jax` too).

Usage:
    python -u benchmarks/overhead.py --threads 1 --rounds 12            # every CPU model, every arm
    python -u benchmarks/overhead.py --models sgd_mlp --arms every=1 every=10
    python -u benchmarks/overhead.py --memory
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vg  # noqa: E402
from keras_vg.monitor import DEFAULT_EVERY  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import add_threads_option, hold_threads, print_table, steps_after_warm_up, time_arms  # noqa: E402


def sgd_mlp():
    """A cheap optimizer, so that nothing hides the monitor's own work: 12 tanh layers, 384 wide."""
    layers = [keras.Input((384,))]
    layers += [keras.layers.Dense(384, activation="tanh") for _ in range(12)]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers), np.random.rand(64 * 64, 384).astype("float32"), 64


def sigmoid_mlp():
    layers = [keras.Input((256,))]
    layers += [keras.layers.Dense(256, activation="sigmoid") for _ in range(20)]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers), np.random.rand(128 * 64, 256).astype("float32"), 128


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


def gpu_mlp():
    """Big enough to keep a GPU busy: 8 x 4096 ReLU, 134 M parameters (537 MB in float32), batch 1024."""
    layers = [keras.Input((4096,))] + [keras.layers.Dense(4096, activation="relu") for _ in range(8)]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers), np.random.rand(1024 * 16, 4096).astype("float32"), 1024


def describe_backend():
    """The backend, its version and its devices, for the tables' headers."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return f"JAX {jax.__version__}, devices {[d.device_kind for d in jax.devices()]}"
    import tensorflow as tf

    return f"TensorFlow {tf.__version__}, devices {[d.device_type for d in tf.config.list_physical_devices()]}"


def wide_relu_mlp():
    """For memory: 4 x 2048 ReLU, about 55 MB of parameters."""
    layers = [keras.Input((1024,))] + [keras.layers.Dense(2048, activation="relu") for _ in range(4)]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers), np.random.rand(64 * 16, 1024).astype("float32"), 64


MODELS = {"sgd_mlp": sgd_mlp, "mlp": sigmoid_mlp, "cnn": small_cnn, "transformer": small_transformer,
          "gpu_mlp": gpu_mlp}
"""Reference models: builders returning `(model, inputs, batch size)`."""


def optimizer_for(name):
    """Plain SGD for the SGD MLP, so that nothing hides the monitor's own work; Adam for the others."""
    return keras.optimizers.SGD(0.01) if name == "sgd_mlp" else keras.optimizers.Adam(1e-4)


def monitor(every, stats=None):
    return lambda log_dir: [keras_vg.GradientMonitor(log_dir, every=every, stats=stats, verbose=0)]


ARMS = {
    "plain (A/A)": lambda log_dir: [],
    "every=1": monitor(1),
    "every=10": monitor(10),
    "every=100": monitor(100),
    f"default (every={DEFAULT_EVERY})": lambda log_dir: [keras_vg.GradientMonitor(log_dir, verbose=0)],
    "every=1, grad_norm": monitor(1, ["grad_norm"]),
    "every=1, gradients": monitor(1, ["grad_norm", "grad_max_abs", "grad_nonfinite", "global_grad_norm"]),
    "every=1, weights": monitor(1, ["weight_norm", "update_ratio"]),
    "every=1, activations": monitor(1, ["dead_fraction", "saturation_fraction"]),
    "AutoClip armed": lambda log_dir: [keras_vg.AutoClip(verbose=0)],
    "AutoClip on": lambda log_dir: [keras_vg.AutoClip(trigger=None, verbose=0)],
    "Keras global_clipnorm=1": None,  # the optimizer clips: no callback
}
"""Arms beside plain `fit`: a function of a log directory returning the arm's callbacks."""


def compile_arm(model, optimizer, arm, jit_compile="auto"):
    """Compiles as users do: Keras's "auto" is XLA on JAX (where False would run eagerly) and a
    GPU, a plain tf.function on TensorFlow's CPU."""
    if arm == "Keras global_clipnorm=1":
        optimizer = type(optimizer).from_config({**optimizer.get_config(), "global_clipnorm": 1.0})
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)


def make_arms(name, arm_names, log_root, jit_compile):
    models, callbacks = {}, {}
    for arm in ["plain"] + arm_names:
        keras.utils.set_random_seed(0)
        model, _, _ = MODELS[name]()
        compile_arm(model, optimizer_for(name), arm, jit_compile)
        models[arm] = model
        # One set of callbacks per arm for all rounds, as in one long fit: a monitor keeps its
        # traced functions across fit calls, so only the warm-up round traces.
        factory = ARMS.get(arm)
        callbacks[arm] = factory(os.path.join(log_root, str(len(callbacks)))) if factory else []
    return models, callbacks


def run_model(name, arm_names, rounds, batches, jit_compile="auto"):
    keras.utils.set_random_seed(0)
    _, x, batch = MODELS[name]()
    x = x[: batch * batches]
    y = np.random.randint(0, 10, size=len(x))
    first_fit = {}

    def fit(model, callbacks):
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
        first_fit.setdefault(id(model), time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as log_root:
        models, callbacks = make_arms(name, arm_names, log_root, jit_compile)
        wall, cpu = time_arms(models, callbacks, fit, rounds)
    xla = ", jit_compile=True" if jit_compile is True else ""
    print_table(f"{name}{xla}: batch {batch}, {batches} batches/round, {rounds} rounds", wall, cpu,
                steps_after_warm_up(batches))
    plain_later = statistics.median(wall["plain"]) * batches / steps_after_warm_up(batches)
    print("\nExtra time of the first fit (tracing and compiling), against plain's:")
    for arm, model in models.items():
        if arm != "plain":
            extra = first_fit[id(model)] - first_fit[id(models["plain"])]
            print(f"- {arm}: {extra:+.2f} s (plain's first fit {first_fit[id(models['plain'])]:.2f} s, "
                  f"a later one {plain_later:.2f} s)")
    return wall


def peak_memory(arm, steps):
    """In this process: peak resident memory of a fit of `arm` on the wide MLP, and the parameters' bytes."""
    keras.utils.set_random_seed(0)
    model, x, batch = wide_relu_mlp()
    compile_arm(model, keras.optimizers.Adam(1e-4), arm)
    factory = ARMS.get(arm)
    y = np.random.randint(0, 10, size=len(x))
    with tempfile.TemporaryDirectory() as log_dir:
        callbacks = factory(log_dir) if factory else []
        model.fit(x, y, batch_size=batch, epochs=max(1, steps * batch // len(x)), verbose=0, callbacks=callbacks)
    parameters = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, parameters


def memory_table(arm_names, repeats):
    print("\nPeak resident memory of one process per arm, 4 x 2048 ReLU MLP, Adam, above plain's "
          f"(median of {repeats} processes each, the arms' processes interleaved):")
    arms = ["plain"] + arm_names
    values = {arm: [] for arm in arms}
    for _ in range(repeats):  # round-robin, so that a drift of the machine's memory reaches every arm alike
        for arm in arms:
            out = subprocess.run([sys.executable, __file__, "--peak-memory-of", arm], capture_output=True,
                                 text=True, check=True)
            values[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    peaks = {arm: (statistics.median(v[0] for v in runs), runs[0][1]) for arm, runs in values.items()}
    plain, parameters = peaks.pop("plain")
    print(f"plain: {plain / 2**20:.0f} MiB; parameters {parameters / 2**20:.1f} MiB\n")
    print("| arm | extra peak memory | as a multiple of the parameters | spread of its processes |")
    print("|---|---|---|---|")
    for arm, (peak, _) in peaks.items():
        runs = [v[0] for v in values[arm]]
        print(f"| {arm} | {(peak - plain) / 2**20:+.1f} MiB | {(peak - plain) / parameters:+.2f}x | "
              f"{(min(runs) - plain) / parameters:+.2f}x to {(max(runs) - plain) / parameters:+.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "gpu_mlp"], choices=list(MODELS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM",
                        help=f"Arms beside plain fit, from: {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", type=int, default=40)
    add_threads_option(parser)
    parser.add_argument("--jit", action="store_true", help="Compile every arm with jit_compile=True (XLA).")
    parser.add_argument("--memory", action="store_true", help="Measure peak memory instead of step time.")
    parser.add_argument("--repeats", type=int, default=3, help="Processes per arm for --memory.")
    parser.add_argument("--peak-memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    hold_threads(args.threads)
    if args.peak_memory_of:
        print(json.dumps(peak_memory(args.peak_memory_of, steps=40)))
        return
    print(f"Keras {keras.__version__} on {describe_backend()}")
    if args.memory:
        memory_table(args.arms, args.repeats)
        return
    for name in args.models:
        run_model(name, args.arms, args.rounds, args.batches, True if args.jit else "auto")


if __name__ == "__main__":
    main()
