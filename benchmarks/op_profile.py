"""Where a monitored step's time goes: kernel time per op type, from TensorFlow's profiler.

Each arm (plain `fit`, GradientMonitor every=1, every=10) trains its own copy
of the model. After a warm-up, the arms take turns, each profiling one short
`fit` per round; the table gives each op type's kernel time per step
(median over the rounds), the executor's per-op time ("Process", which
includes the kernels), and how many ops per step keras-vg added (ops in its
`keras_vg` name scope). It explains the ratios of `overhead.py`: what the
monitor's own kernels cost, and what it changes in the kernels of the
training step itself.

The profile is read from the XPlane protobuf that `tf.profiler` writes
(`tensorflow.tsl.profiler.protobuf`, not a public API; read with TensorFlow
2.21).

Usage:
    python -u benchmarks/op_profile.py --threads 1
    python -u benchmarks/op_profile.py --threads 1 --model cnn --rounds 8
"""

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_vg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import add_threads_option, hold_threads  # noqa: E402
from overhead import MODELS, optimizer_for  # noqa: E402

ARMS = {"plain": None, "every=1": 1, "every=10": 10}
"""Monitors' `every` by arm; every=10's steps between records run Keras's own function."""
STEPS = 20


def kernel_times(log_dir):
    """Returns `(ms per op type, keras_vg ops)` summed over one profile's compute threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    times, ours = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                metadata = plane.event_metadata[event.metadata_id]
                op_type = metadata.name.rsplit(":", 1)[-1]
                times[op_type] += event.duration_ps / 1e9
                if "keras_vg" in metadata.name and op_type != "Process":
                    ours[op_type] += 1
    return times, ours


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sgd_mlp", choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=25, help="Op types shown, the dearest first.")
    add_threads_option(parser)
    args = parser.parse_args()
    hold_threads(args.threads)
    build = MODELS[args.model]
    keras.utils.set_random_seed(0)
    _, x, batch = build()
    x = x[: batch * STEPS]
    y = np.random.randint(0, 10, size=len(x))
    with tempfile.TemporaryDirectory() as root:
        fits = {}
        for arm, every in ARMS.items():
            keras.utils.set_random_seed(0)
            model, _, _ = build()
            model.compile(optimizer=optimizer_for(args.model),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            callbacks = [] if every is None else [keras_vg.GradientMonitor(f"{root}/{every}", every=every, verbose=0)]
            fits[arm] = (model, callbacks)
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)  # warm-up: tracing
        per_step = {arm: collections.defaultdict(list) for arm in ARMS}
        ops_per_step = {}
        names = list(ARMS)
        for round_index in range(args.rounds):
            offset = round_index % len(names)
            for arm in names[offset:] + names[:offset]:
                model, callbacks = fits[arm]
                log_dir = tempfile.mkdtemp(dir=root)
                tf.profiler.experimental.start(log_dir)
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
                tf.profiler.experimental.stop()
                times, ours = kernel_times(log_dir)
                for op_type, ms in times.items():
                    per_step[arm][op_type].append(ms / STEPS)
                per_step[arm]["all kernels"].append(sum(ms for t, ms in times.items() if t != "Process") / STEPS)
                ops_per_step[arm] = sum(ours.values()) / STEPS
    medians = {arm: {t: statistics.median(v + [0.0] * (args.rounds - len(v))) for t, v in table.items()}
               for arm, table in per_step.items()}
    op_types = sorted(set().union(*medians.values()), key=lambda t: -max(m.get(t, 0.0) for m in medians.values()))
    print(f"\n{args.model}: kernel time per step in ms, median of {args.rounds} rounds of {STEPS} steps")
    print("| op type | " + " | ".join(ARMS) + " |")
    print("|---|" + "---|" * len(ARMS))
    for op_type in op_types[: args.rows]:
        print(f"| {op_type} | " + " | ".join(f"{medians[arm].get(op_type, 0.0):.3f}" for arm in ARMS) + " |")
    print("| keras_vg ops per step | " + " | ".join(f"{ops_per_step[arm]:.0f}" for arm in ARMS) + " |")


if __name__ == "__main__":
    main()
