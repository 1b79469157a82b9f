"""Quickstart: the lines a user adds to see gradient health in TensorBoard.

Trains a deliberately deep sigmoid network (whose lower layers' gradients
vanish) on synthetic data, with the monitor recording every step, then prints
the diagnosis.

    python examples/quickstart.py --log-dir logs/quickstart       # about 15 s on 2 CPU cores
    python examples/quickstart.py --epochs 1                       # a quick smoke run
    keras-vg report logs/quickstart
    keras-vg plot logs/quickstart -o heatmap.png
    tensorboard --logdir logs --samples_per_plugin=keras_vg=0
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vg  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="logs/quickstart")
    parser.add_argument("--epochs", type=int, default=5, help="epochs to train (default: 5)")
    args = parser.parse_args(argv)

    rng = np.random.RandomState(0)
    x = rng.randn(2048, 32).astype("float32")
    y = (np.sin(x[:, :4].sum(axis=1)) > 0).astype("float32")

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((32,))]
        + [keras.layers.Dense(64, activation="sigmoid") for _ in range(10)]
        + [keras.layers.Dense(1, activation="sigmoid")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy", metrics=["accuracy"])

    # The one line: a callback that records gradient health inside the train step.
    monitor = keras_vg.GradientMonitor(log_dir=args.log_dir, every=1)
    model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=2, callbacks=[monitor])

    # Read the records back: as numpy arrays, and as a diagnosis with remedies for this model
    # (the same text as `keras-vg report LOG_DIR`).
    run = keras_vg.read_run(args.log_dir)
    steps, names, norms = run.stat("grad_norm")
    print(f"recorded {len(steps)} steps of {len(names)} variables into {args.log_dir}\n")
    print(run.diagnose())


if __name__ == "__main__":
    main()
