"""Step-time overhead of AutoClip against plain `fit`, and against Keras's own `global_clipnorm`, in one process.

The method is `benchmarks/interleaved.py`: interleaved rounds after a warm-up
round, each arm timed per step with a batch-begin timer from its third batch
on, ratios to plain `fit` paired within each round, beside an A/A row (plain
against plain) that shows the noise floor of the machine.

Models: those of `benchmarks/overhead.py`, with its optimizers: `sgd_mlp`, a
12-layer tanh MLP (384 wide, batch 64) trained with plain SGD (0.01), whose
cheap optimizer hides none of AutoClip's own work, and `mlp`, `cnn`,
`transformer` (Adam); `gpu_mlp` is for a GPU.

The armed arms are AutoClip as it starts: training is calm, so they pay for
the decision every step (the global norm, the guard's and the policy's
statistics, the records, the skip guard) but clip nothing; one of them
without the skip guard (`skip_nonfinite=False`). The "on" arms clip every
step (no trigger, a bound below every norm): with the global-norm policy one
multiplication per gradient (and, with SGD, the weights' norm for the
guard's cap), with AGC the unit-wise norms of every weight and gradient.
Keras's own `global_clipnorm` (1e9: it never clips, but like AutoClip it reads
every gradient for the norm, and it then multiplies every gradient) is the
target's reference.

Usage:
    python -u benchmarks/clip_overhead.py                  # the SGD MLP, 12 rounds
    python -u benchmarks/clip_overhead.py --models sgd_mlp mlp --threads 1 --rounds 16
    python -u benchmarks/clip_overhead.py --threads 1 --jit         # XLA
    python -u benchmarks/clip_overhead.py --threads 1 --per-step 600   # and paired step by step
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import add_threads_option, hold_threads, print_table, time_arms  # noqa: E402
from overhead import MODELS, optimizer_for  # noqa: E402

import keras_vg  # noqa: E402


def optimizer(name, **kwargs):
    """The model's optimizer in `benchmarks/overhead.py` (SGD for `sgd_mlp`, Adam otherwise), with `kwargs`."""
    reference = optimizer_for(name)
    return type(reference).from_config({**reference.get_config(), **kwargs})


ARMS = {
    "plain": lambda: None,
    "plain (A/A)": lambda: None,
    "AutoClip armed (default)": lambda: keras_vg.AutoClip(verbose=0),
    "AutoClip armed, percentile": lambda: keras_vg.AutoClip("percentile", verbose=0),
    # What the skip guard around the update costs: the same, without it.
    "AutoClip armed, skip_nonfinite=False": lambda: keras_vg.AutoClip(
        keras_vg.ZScore(skip_nonfinite=False), verbose=0),
    "AutoClip on, global_norm clipping every step": lambda: keras_vg.AutoClip(
        keras_vg.GlobalNorm(1e-6), trigger=None, verbose=0),
    # Armed AGC computes nothing unit-wise (see AGC.lazy); switched on, it reads every weight.
    "AutoClip on, agc clipping every step": lambda: keras_vg.AutoClip(
        keras_vg.AGC(clip_factor=1e-6), trigger=None, verbose=0),
    "Keras global_clipnorm (reference)": lambda: None,
}

OPTIMIZER_ARGUMENTS = {"Keras global_clipnorm (reference)": {"global_clipnorm": 1e9}}
"""Keras's own clipping, for scale: it too needs every gradient's norm before any update."""


def build_arms(name, batches, jit_compile):
    """`(models, callbacks, x, y, batch)`: every arm's own model, compiled, and its callbacks."""
    build = MODELS[name]
    keras.utils.set_random_seed(0)
    _, x, batch = build()
    x = x[: batch * batches]
    y = np.random.randint(0, 10, size=len(x))
    models, callbacks = {}, {}
    for arm, make in ARMS.items():
        keras.utils.set_random_seed(0)
        model, _, _ = build()
        model.compile(optimizer=optimizer(name, **OPTIMIZER_ARGUMENTS.get(arm, {})),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
        models[arm] = model
        clip = make()
        # One callback per arm for all rounds: a later fit reuses the traced function.
        callbacks[arm] = [clip] if clip is not None else []
    return models, callbacks, x, y, batch


def check_armed(callbacks):
    """The armed arms must have stayed armed: otherwise they measured clipping, not the armed step."""
    for arm, arm_callbacks in callbacks.items():
        if "armed" in arm and arm_callbacks and arm_callbacks[0].active:
            raise AssertionError(f"{arm}: clipping switched on during the benchmark")


def run_model(name, rounds, batches, jit_compile=False):
    models, callbacks, x, y, batch = build_arms(name, batches, jit_compile)

    def trace_counts():
        return {arm: c[0].trace_count for arm, c in callbacks.items() if c}

    warmed_up = {}
    wall, cpu = time_arms(models, callbacks, lambda model, arm_callbacks: model.fit(
        x, y, batch_size=batch, epochs=1, verbose=0, callbacks=arm_callbacks), rounds,
        on_warmed_up=lambda: warmed_up.update(trace_counts()))
    xla = ", jit_compile=True" if jit_compile else ""
    print_table(f"{name}{xla}: batch {batch}, {batches} batches/round, {rounds} rounds", wall, cpu, batches - 3)
    assert trace_counts() == warmed_up, (warmed_up, trace_counts())  # no retrace after the warm-up round
    check_armed(callbacks)
    return wall


def run_per_step(name, steps, jit_compile=False):
    """Pairs the arms step by step: `train_on_batch` on each arm in turn, `steps` times.

    A finer pairing than rounds of `fit`: each step's time is divided by
    plain's time for its neighbouring step, which cancels a shared machine's
    drifts within milliseconds, not seconds. What it leaves out: the
    callbacks' host work (AutoClip's reads every 32 steps), which a batch
    does not wait for anyway.
    """
    models, callbacks, x, y, batch = build_arms(name, 30, jit_compile)
    for arm, model in models.items():  # installs the hooks and traces, as fit does
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks[arm])
    names = list(models)
    times = {arm: [] for arm in names}
    batches = len(x) // batch
    for index in range(steps):
        # The batches in turn, as fit takes them: one batch over and over is no calm training (the
        # model overfits it, and a later norm can be a spike that switches clipping on).
        at = (index % batches) * batch
        xb, yb = x[at: at + batch], y[at: at + batch]
        offset = index % len(names)
        for arm in names[offset:] + names[:offset]:
            start = time.perf_counter()
            models[arm].train_on_batch(xb, yb)
            times[arm].append(time.perf_counter() - start)
    check_armed(callbacks)
    base = times["plain"]
    xla = ", jit_compile=True" if jit_compile else ""
    print(f"\n{name}{xla}: batch {batch}, {steps} steps per arm, paired step by step "
          f"(plain: median {statistics.median(base) * 1e3:.1f} ms/step)")
    print("| arm | median paired step ratio [quartiles] |")
    print("|---|---|")
    for arm in names[1:]:
        ratios = [t / b for t, b in zip(times[arm], base)]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(f"| {arm} | {median:.3f} [{q1:.3f}, {q3:.3f}] |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sgd_mlp"], choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", type=int, default=30)
    add_threads_option(parser)
    parser.add_argument("--jit", action="store_true", help="Compile every arm with jit_compile=True (XLA).")
    parser.add_argument("--per-step", type=int, default=0, metavar="STEPS",
                        help="Also pair the arms step by step (train_on_batch), STEPS steps per arm.")
    args = parser.parse_args()
    hold_threads(args.threads)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}")
    for name in args.models:
        run_model(name, args.rounds, args.batches, args.jit)
        if args.per_step:
            run_per_step(name, args.per_step, args.jit)


if __name__ == "__main__":
    main()
