"""Vanishing gradients in a deep MLP, and three classic remedies, on real data.

The same 10-hidden-layer network classifies scikit-learn's handwritten digits
(`load_digits`: 1,797 8x8 images that ship inside scikit-learn, so nothing is
downloaded) in four variants:

- `sigmoid`: sigmoid activations, Glorot initialisation. The lower layers'
  gradients vanish and the net barely learns.
- `relu_he`: ReLU activations with He initialisation.
- `batchnorm`: the sigmoid net with BatchNormalization before each activation.
- `residual`: the sigmoid net with a skip connection around each layer.

Each trains with plain SGD and a `GradientMonitor`; the script prints a table
of validation accuracy, the first/last gradient-norm ratio and what the
diagnosis found, then the full report of the sigmoid net. Only the sigmoid
net's gradients vanish; each remedy's run has no finding.

    pip install scikit-learn
    python examples/vanishing_mlp.py                 # about 45 s on 2 CPU cores
    python examples/vanishing_mlp.py --epochs 1      # a quick smoke run
    keras-vg report logs/vanishing_mlp/sigmoid
    tensorboard --logdir logs/vanishing_mlp --samples_per_plugin=keras_vg=0
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vg  # noqa: E402

DEPTH, WIDTH = 10, 64
LEARNING_RATE = 0.05
VARIANTS = ("sigmoid", "relu_he", "batchnorm", "residual")


def load_data():
    """Digits scaled to [0, 1], split 80/20 with a fixed shuffle."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype("float32"), y[order].astype("int32")
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def build(variant):
    """The same depth and width in every variant; only the fix differs."""
    inputs = keras.Input((64,))
    x = inputs
    if variant == "residual":
        x = keras.layers.Dense(WIDTH)(x)  # a projection, so that each block can add to x
    for _ in range(DEPTH):
        if variant == "sigmoid":
            x = keras.layers.Dense(WIDTH, activation="sigmoid")(x)
        elif variant == "relu_he":
            x = keras.layers.Dense(WIDTH, activation="relu", kernel_initializer="he_normal")(x)
        elif variant == "batchnorm":
            x = keras.layers.Dense(WIDTH, use_bias=False)(x)  # BatchNormalization's beta is the bias
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Activation("sigmoid")(x)
        else:
            x = keras.layers.Add()([x, keras.layers.Dense(WIDTH, activation="sigmoid")(x)])
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=variant)


def train(variant, data, epochs, log_dir):
    keras.backend.clear_session()  # layer names restart at dense, dense_1, ... in every variant
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = data
    model = build(variant)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    monitor = keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[monitor])
    accuracy = model.evaluate(x_val, y_val, verbose=0)[1]
    return accuracy, keras_vg.read_run(log_dir).diagnose()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="logs/vanishing_mlp", help="one run per variant below it")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per variant (default: 10)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)

    data = load_data()
    results = {}
    for variant in args.variants:
        results[variant] = train(variant, data, args.epochs, os.path.join(args.log_dir, variant))

    print(f"\n{DEPTH} hidden layers of {WIDTH} units, SGD({LEARNING_RATE}), {args.epochs} epochs on sklearn's digits")
    print(f"{'variant':<10} {'val acc':>7}  {'first/last grad norm':>20}  findings")
    for variant, (accuracy, diagnosis) in results.items():
        ratio = diagnosis.first_last_ratio
        kinds = ", ".join(sorted(diagnosis.kinds)) or "none"
        print(f"{variant:<10} {accuracy:>7.3f}  {ratio:>20.2g}  {kinds}")
    if "sigmoid" in results:
        print()
        print(results["sigmoid"][1])


if __name__ == "__main__":
    main()
