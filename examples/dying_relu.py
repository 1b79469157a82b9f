"""Dying ReLU: a learning rate too large for Adam kills most ReLU units, and the monitor finds them.

A 4-layer ReLU MLP with He initialisation classifies scikit-learn's digits
(`load_digits`, shipped inside scikit-learn) twice: with Adam's default
learning rate 1e-3, and with 0.05. The large steps of the second run push
most units' pre-activations below 0 for every input within a few steps; a
dead unit has zero gradient, so it never recovers. `GradientMonitor` records
the fraction of each ReLU layer's units that output 0 (pass no gradient) for
a whole batch; the diagnosis reports the layers where that fraction reaches
70%, from which step, and remedies. The run at 1e-3 has no finding.

    pip install scikit-learn
    python examples/dying_relu.py                 # about 20 s on 2 CPU cores
    python examples/dying_relu.py --epochs 1      # a quick smoke run
    keras-vg report logs/dying_relu/lr_0.05
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vg  # noqa: E402

LEARNING_RATES = (1e-3, 0.05)


def load_data():
    """Digits scaled to [0, 1], split 80/20 with a fixed shuffle."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype("float32"), y[order].astype("int32")
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(learning_rate, data, epochs, log_dir):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = data
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(128, activation="relu", kernel_initializer="he_normal") for _ in range(4)]
        + [keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    monitor = keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[monitor])
    accuracy = model.evaluate(x_val, y_val, verbose=0)[1]
    run = keras_vg.read_run(log_dir)
    _, _, dead = run.stat("dead_fraction")
    return accuracy, dead[-1], run.diagnose()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="logs/dying_relu", help="one run per learning rate below it")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (default: 5)")
    args = parser.parse_args(argv)

    data = load_data()
    print(f"\n4 ReLU layers of 128 units (he_normal), Adam, {args.epochs} epochs on sklearn's digits")
    print(f"{'learning rate':<14} {'val acc':>7}  {'dead units per layer (last record)':<36} findings")
    bad = None
    for learning_rate in LEARNING_RATES:
        log_dir = os.path.join(args.log_dir, f"lr_{learning_rate:g}")
        accuracy, dead, diagnosis = train(learning_rate, data, args.epochs, log_dir)
        dead_text = " ".join(f"{d:.0%}" for d in dead)
        kinds = ", ".join(sorted(diagnosis.kinds)) or "none"
        print(f"{learning_rate:<14g} {accuracy:>7.3f}  {dead_text:<36} {kinds}")
        if "dead" in diagnosis.kinds:
            bad = diagnosis
    if bad is not None:
        print()
        print(bad)


if __name__ == "__main__":
    main()
