"""What each group of statistics costs: GradientMonitor with subsets of `stats=`, against plain `fit`.

The method is `benchmarks/interleaved.py` (interleaved rounds, ratios paired
within each round, an A/A row). Each arm records one group of statistics, so
the table splits the monitor's step time into gradient, weight and activation
work; the groups share the read, the writes and the record-step branches, so
their costs add up to more than the whole.

Usage:
    python -u benchmarks/stat_costs.py --threads 1                    # the sigmoid MLP, every=1
    python -u benchmarks/stat_costs.py --threads 1 --every 10 --rounds 20
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import add_threads_option, hold_threads, print_table, time_arms  # noqa: E402
from overhead import MODELS  # noqa: E402

GROUPS = {
    "all statistics": None,
    "gradient": ["grad_norm", "grad_max_abs", "grad_nonfinite", "global_grad_norm"],
    "grad_nonfinite alone": ["grad_nonfinite"],
    "weight": ["weight_norm", "update_ratio"],
    "activation": ["dead_fraction", "saturation_fraction"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=list(MODELS))
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batches", type=int, default=30)
    add_threads_option(parser)
    parser.add_argument("--jit", action="store_true", help="Compile every arm with jit_compile=True (XLA).")
    args = parser.parse_args()
    hold_threads(args.threads)
    build = MODELS[args.model]
    keras.utils.set_random_seed(0)
    _, x, batch = build()
    x = x[: batch * args.batches]
    y = np.random.randint(0, 10, size=len(x))
    with tempfile.TemporaryDirectory() as log_root:
        callbacks = {"plain": [], "plain (A/A)": []}
        for group, stats in GROUPS.items():
            callbacks[group] = [keras_vg.GradientMonitor(f"{log_root}/{len(callbacks)}", every=args.every,
                                                         stats=stats, verbose=0)]
        models = {}
        for arm in callbacks:
            keras.utils.set_random_seed(0)
            model, _, _ = build()
            model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=args.jit,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            models[arm] = model
        wall, cpu = time_arms(models, callbacks, lambda model, arm_callbacks: model.fit(
            x, y, batch_size=batch, epochs=1, verbose=0, callbacks=arm_callbacks), args.rounds)
    xla = ", jit_compile=True" if args.jit else ""
    print_table(f"{args.model}{xla}, every={args.every}: {args.batches} batches/round, {args.rounds} rounds",
                wall, cpu, args.batches - 3)


if __name__ == "__main__":
    main()
