"""Does AutoClip rescue models that explode, and leave healthy ones alone? Final losses, arm by arm.

Every model trains from the same seed on the same synthetic data (nothing is
downloaded), once per arm:

- `none`: no clipping;
- `static 0.1`, `static 1`, `static 10`: Keras's `global_clipnorm`;
- `AutoClip()`: the defaults (ZScore policy, spike guard, SGD update-ratio
  rules);
- `percentile`, `agc`, `global_norm`: `AutoClip(policy=...)` at that
  policy's defaults;
- `no SGD rules`: `AutoClip()` without the guard's SGD update-ratio rules
  (`spike_update_ratio=None, clip_update_ratio=None`), to show what they do;
- `best static, late`: the best of the three static thresholds, switched on
  where the guard's median rule first sees a spike (`GlobalNorm` at that
  threshold, without the SGD rules): what any threshold learnt from the norms
  could do at best, once it has seen a spike.

The final loss is the model's loss on its whole training set after training
(`evaluate`), `inf` where it is not finite. For AutoClip arms the step at
which clipping switched on follows in brackets (`-`: never).

Targets (issue 13): on every exploding model, `AutoClip()` ends finite and at
most 1.5 times the best static threshold's loss; on every healthy model it
never switches on, and ends within 0.5% of `none`.

Usage:
    python -u benchmarks/autoclip_rescue.py                       # every model, every arm (~20 min on 2 cores)
    python -u benchmarks/autoclip_rescue.py --models lstm_sgd5 gru_adam --arms none "AutoClip()"
    python -u benchmarks/autoclip_rescue.py --threads 1           # steadier on a shared machine
"""

import argparse
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import add_threads_option, hold_threads  # noqa: E402

import keras_vg  # noqa: E402

BATCH, BATCHES, EPOCHS = 32, 40, 3


# Data: small synthetic regression and classification tasks --------------------------------


def sequences(length=60, features=2, seed=0):
    """Standard normal sequences; the target is the last input's first feature plus half the one before."""
    x = np.random.RandomState(seed).randn(BATCH * BATCHES, length, features).astype("float32")
    return x, (x[:, -1, :1] + 0.5 * x[:, -2, :1]).astype("float32")


def tabular(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(BATCH * BATCHES, 16).astype("float32")
    return x, np.sin(0.5 * x @ rng.randn(16, 1)).astype("float32")


def images(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(BATCH * BATCHES, 12, 12, 3).astype("float32")
    y = np.tanh(x.reshape(len(x), -1) @ rng.randn(12 * 12 * 3, 1) / 20) + x[:, :4, :4, 0].mean((1, 2))[:, None]
    return x, y.astype("float32")


def tokens(seed=0):
    """Sequences of 16 vectors; the class is the argmax of a projection of their mean."""
    rng = np.random.RandomState(seed)
    x = rng.randn(BATCH * BATCHES, 16, 32).astype("float32")
    return x, np.argmax(x.mean(1) @ rng.randn(32, 10), 1)


def curriculum(seed=0):
    """The curriculum of tests/test_clipping.py: 40 batches of short sequences, then long ones (explodes at 40)."""
    rng = np.random.RandomState(seed)
    x = rng.randn(64 * BATCH, 80, 1).astype("float32")
    x[: 40 * BATCH, :70] = 0.0
    return x, (x[:, -1] + 0.5 * x[:, -2]).astype("float32")


# Models ---------------------------------------------------------------------------------------


def recurrent(layer, units, gain, length=60, features=2):
    return keras.Sequential([
        keras.Input((length, features)),
        layer(units, recurrent_initializer=keras.initializers.Orthogonal(gain=gain)),
        keras.layers.Dense(1),
    ])


def relu_mlp(depth, width, scale):
    init = keras.initializers.VarianceScaling(scale, "fan_in", "normal")
    return keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(width, activation="relu",
                                                                       kernel_initializer=init)
                                                    for _ in range(depth)] + [keras.layers.Dense(1)])


def tanh_mlp(depth, width):
    return keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(width, activation="tanh")
                                                    for _ in range(depth)] + [keras.layers.Dense(1)])


def cnn():
    """Three convolutions without BatchNormalization, then a linear head (regression)."""
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(1),
    ])


def transformer():
    """Two post-LayerNorm encoder blocks (4 heads, width 32) and a classifier head."""
    inputs = keras.Input((16, 32))
    x = inputs
    for _ in range(2):
        attention = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(x, x)
        x = keras.layers.LayerNormalization()(x + attention)
        hidden = keras.layers.Dense(64, activation="relu")(x)
        x = keras.layers.LayerNormalization()(x + keras.layers.Dense(32)(hidden))
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x)))


def linear_rnn():
    return keras.Sequential([
        keras.Input((80, 1)),
        keras.layers.SimpleRNN(8, activation="linear", use_bias=False,
                               recurrent_initializer=keras.initializers.Orthogonal(gain=1.1)),
        keras.layers.Dense(1),
    ])


def sgd(lr, **kwargs):
    return lambda **clip: keras.optimizers.SGD(lr, **kwargs, **clip)


def adam(lr):
    return lambda **clip: keras.optimizers.Adam(lr, **clip)


SPARSE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# name: (kind, what it is, build, data, optimizer, loss, epochs)
MODELS = {
    "rnn_gain15_sgd02": ("exploding", "SimpleRNN(64), recurrent gain 1.5, SGD 0.2",
                         lambda: recurrent(keras.layers.SimpleRNN, 64, 1.5), sequences, sgd(0.2), "mse", EPOCHS),
    "rnn_gain12_sgd05": ("exploding", "SimpleRNN(32), recurrent gain 1.2, SGD 0.5",
                         lambda: recurrent(keras.layers.SimpleRNN, 32, 1.2), sequences, sgd(0.5), "mse", EPOCHS),
    "relu_mlp_big_init": ("exploding", "6x128 ReLU MLP, VarianceScaling(4.0), SGD 0.05",
                          lambda: relu_mlp(6, 128, 4.0), tabular, sgd(0.05), "mse", EPOCHS),
    "lstm_sgd5": ("exploding", "LSTM(32), SGD 5.0", lambda: recurrent(keras.layers.LSTM, 32, 1.0), sequences,
                  sgd(5.0), "mse", EPOCHS),
    "cnn_no_bn_sgd03": ("exploding", "3-conv ReLU CNN without BatchNorm, SGD 0.3", cnn, images, sgd(0.3), "mse",
                        EPOCHS),
    "transformer_sgd1": ("exploding", "2-block Transformer, SGD 1.0, no warm-up", transformer, tokens, sgd(1.0),
                         SPARSE, EPOCHS),
    "linear_rnn_curriculum": ("exploding", "linear SimpleRNN(8), gain 1.1, SGD 0.005; long sequences from step 40",
                              linear_rnn, curriculum, sgd(0.005), "mse", 2),
    "gru_adam": ("healthy", "GRU(32), Adam 1e-3", lambda: recurrent(keras.layers.GRU, 32, 1.0), sequences,
                 adam(1e-3), "mse", EPOCHS),
    "relu_mlp_adam": ("healthy", "4x64 ReLU MLP, Adam 1e-3", lambda: relu_mlp(4, 64, 2.0), tabular, adam(1e-3),
                      "mse", EPOCHS),
    "tanh_mlp_sgd": ("healthy", "6x64 tanh MLP, SGD 0.1", lambda: tanh_mlp(6, 64), tabular, sgd(0.1), "mse",
                     EPOCHS),
    "rnn_sgd": ("healthy", "SimpleRNN(32), gain 1.0, SGD 0.05", lambda: recurrent(keras.layers.SimpleRNN, 32, 1.0),
                sequences, sgd(0.05), "mse", EPOCHS),
    "cnn_sgd_momentum": ("healthy", "the CNN above, SGD 0.01 with momentum 0.9", cnn, images,
                         sgd(0.01, momentum=0.9), "mse", EPOCHS),
    "transformer_adam": ("healthy", "the Transformer above, Adam 1e-3", transformer, tokens, adam(1e-3), SPARSE,
                         EPOCHS),
}

ARMS = {
    "none": None,
    "static 0.1": {"global_clipnorm": 0.1},
    "static 1": {"global_clipnorm": 1.0},
    "static 10": {"global_clipnorm": 10.0},
    "AutoClip()": lambda: keras_vg.AutoClip(verbose=0),
    "percentile": lambda: keras_vg.AutoClip(policy="percentile", verbose=0),
    "agc": lambda: keras_vg.AutoClip(policy="agc", verbose=0),
    "global_norm": lambda: keras_vg.AutoClip(policy="global_norm", verbose=0),
    "no SGD rules": lambda: keras_vg.AutoClip(spike_update_ratio=None, clip_update_ratio=None, verbose=0),
    "best static, late": lambda threshold: keras_vg.AutoClip(
        keras_vg.GlobalNorm(threshold), spike_update_ratio=None, clip_update_ratio=None, verbose=0),
}
LATE = "best static, late"
STATIC = ("static 0.1", "static 1", "static 10")


def train(model_name, arm, epochs=None, threshold=None):
    """Trains one model in one arm; returns `(final loss, step clipping switched on or None, AutoClip or None)`.

    `threshold` is the static threshold of the `best static, late` arm.
    """
    _, _, build, data, optimizer, loss, default_epochs = MODELS[model_name]
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = data()
    model = build()
    setting = ARMS[arm]
    clip = (setting(threshold) if arm == LATE else setting()) if callable(setting) else None
    model.compile(optimizer=optimizer(**(setting if isinstance(setting, dict) else {})), loss=loss)
    model.fit(x, y, batch_size=BATCH, epochs=epochs or default_epochs, shuffle=False, verbose=0,
              callbacks=[clip] if clip is not None else [])
    final = float(model.evaluate(x, y, batch_size=256, verbose=0))
    on = None
    if clip is not None:
        switched = [e["step"] for e in clip.drain_events() if e["kind"] == "clip_on"]
        on = switched[0] if switched else None
    return (final if math.isfinite(final) else math.inf), on, clip


def verdict(kind, results):
    """Whether `AutoClip()` meets its targets on one model, as a short string."""
    default, on = results["AutoClip()"]
    if kind == "exploding":
        best = min(results[arm][0] for arm in STATIC)
        ok = math.isfinite(default) and default <= 1.5 * best
        return f"{'met' if ok else 'MISSED'} ({default / best:.2f}x best static)"
    ok = on is None and abs(default - results["none"][0]) <= 0.005 * results["none"][0]
    return f"{'met' if ok else 'MISSED'} ({'no clip_on' if on is None else f'on at {on}'}, " \
           f"{100 * (default / results['none'][0] - 1):+.2f}%)"


def cell(loss, on, autoclip):
    text = "inf" if not math.isfinite(loss) else f"{loss:.3g}"
    return f"{text} [{'-' if on is None else on}]" if autoclip else text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add_threads_option(parser)
    args = parser.parse_args()
    hold_threads(args.threads)
    arms = [arm for arm in ARMS if arm in args.arms]
    print(f"Keras {keras.__version__}; {BATCHES} batches of {BATCH} per epoch; final loss [AutoClip: step on]")
    print("| model | kind | " + " | ".join(arms) + (" | AutoClip() target |" if "AutoClip()" in arms else " |"))
    print("|---" * (len(arms) + 2 + ("AutoClip()" in arms)) + "|")
    for name in args.models:
        kind = MODELS[name][0]
        start = time.time()
        results = {}
        for arm in arms:
            if arm == LATE:
                if not all(static in results for static in STATIC):
                    parser.error(f"`{LATE}` needs the three static arms")
                best = min(STATIC, key=lambda static: results[static][0])
                loss, on, _ = train(name, arm, threshold=ARMS[best]["global_clipnorm"])
            else:
                loss, on, _ = train(name, arm)
            results[arm] = (loss, on)
        cells = [cell(*results[arm], autoclip=callable(ARMS[arm])) for arm in arms]
        needed = STATIC if kind == "exploding" else ("none",)
        target = [] if "AutoClip()" not in arms else [
            verdict(kind, results) if all(arm in results for arm in needed) else "-"]
        print(f"| {name} | {kind} | " + " | ".join(cells + target) + " |", flush=True)
        print(f"<!-- {name}: {MODELS[name][1]}; {time.time() - start:.0f} s -->", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
