"""The diagnosis corpus: healthy and sick models, each recorded once, judged at several cadences.

Every case trains a small model the way tutorials build it, with a
`GradientMonitor(every=1)`. Its ground truth is measured independently of
keras-vg's records: every `PROBE_EVERY` steps a `GradientTape` pass on a fixed
probe batch of 256 samples gives each layer's kernel gradient norm, the
global norm and the loss, and a forward pass gives the activations of every
ReLU-family, sigmoid and tanh layer (see `measure` and `truth`). A healthy
case must train (its loss falls) with none of the sick signs; a sick case
must show its cause.

keras-vg's verdict is `diagnose` on the records kept at steps that are
multiples of each cadence: since every statistic is the record step's own
value, that is what `GradientMonitor(every=k)` would have written.
Non-finite steps between kept records become the `nonfinite` events the
monitor writes for them (format 1.2), built here from the every-step
records. A healthy case passes with no finding at all (structural zeros
are notes, not findings); a sick one with a finding of its cause and a
remedy that fits it (`Case.remedy`), and no remedy the model already
follows (BatchNormalization for a model that has it, gating for gated
recurrent layers, He initialisation for He-initialised layers).

Usage:

    .venv/bin/python benchmarks/diagnosis_corpus.py                  # record and judge every case
    .venv/bin/python benchmarks/diagnosis_corpus.py --reuse          # judge the runs recorded before
    .venv/bin/python benchmarks/diagnosis_corpus.py --cases mlp_bn_sgd dead_negative_bias

Runs go to `logs/diagnosis_corpus/<case>` in the checkout (ignored by git),
with each case's measured truth in `truth.json` beside the events. It prints
the table that docs/DETECTION.md shows, and the findings of every case that
missed its target.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_LOG_DIR = os.path.join(ROOT, "logs", "diagnosis_corpus")
CADENCES = (1, 10, 50)
STEPS = 300
PROBE_EVERY = 25
PROBE_SIZE = 256

# The independent measurement's thresholds: the textbook signs, not keras-vg's rules.
TRUTH_VANISHING_RATIO = 1e-3  # smallest layer's kernel gradient norm over the largest
TRUTH_EXPLODING_NORM = 1e3  # global gradient norm of a mean-reduced loss
TRUTH_EXPLODING_GROWTH = 100.0  # global norm over the first probe's
TRUTH_DEAD_FRACTION = 0.5  # units passing no gradient for all 256 probe samples
TRUTH_SATURATED_FRACTION = 0.5  # hidden activations within 0.01 of an asymptote
TRUTH_TRAINED = 0.9  # a healthy case's last probe loss over its first
TRUTH_MAJORITY = 0.5  # a persistent sign shows at more than this fraction of the probes

SICK_KINDS = ("nonfinite", "exploding", "vanishing", "dead", "saturated")


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the corpus.

    Attributes:
        name: Unique, also the run's directory.
        cause: `"healthy"`, or the finding kind that is its cause.
        build: `() -> keras.Model`, built on an `Input`.
        data: A key of `DATA`.
        optimizer: `() -> keras.optimizers.Optimizer`.
        loss: A Keras loss name, or a callable.
        accept: Other kinds that name the same cause: an explosion that ends
            in NaN is found as `nonfinite` or `exploding`.
        remedy: A remedy key (keras_vg.diagnosis.Remedy) that fits the
            cause, required among the remedies; None for healthy cases.
        steps: Optimizer steps.
        batch_size: Samples per step.
        fast: In the test suite's subset (tests/test_diagnosis_corpus.py).
    """

    name: str
    cause: str
    build: object
    data: str
    optimizer: object
    loss: object = "sparse_categorical_crossentropy"
    accept: tuple = ()
    remedy: str | None = None
    steps: int = STEPS
    batch_size: int = 32
    fast: bool = False

    @property
    def causes(self):
        return (self.cause,) + self.accept


# ---------------------------------------------------------------------------
# Data: nothing is downloaded. Digits ship inside scikit-learn; the rest is made here.


def _digits(raw=False):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(x))
    x = x[order] if raw else x[order] / 16.0  # raw pixels run 0..16: unscaled inputs
    return x.astype("float32"), y[order].astype("int32")


def _digits_images():
    x, y = _digits()
    return x.reshape(-1, 8, 8, 1), y


def _digits_rgb32():
    """Digits upsampled 4x to 32x32, three channels, for keras.applications."""
    x, y = _digits_images()
    x = np.kron(x[:1600], np.ones((1, 4, 4, 1), np.float32))
    return np.repeat(x, 3, axis=-1), y[:1600]


def _sequences(length=20, count=2048, seed=0):
    """Is the sum of the first feature over the sequence positive? `[N, length, 4]`."""
    rng = np.random.RandomState(seed)
    x = rng.randn(count, length, 4).astype("float32")
    return x, (x[:, :, 0].sum(axis=1) > 0).astype("int32")


def _long_sequences():
    return _sequences(length=60)


def _long_regression(length=60, count=2048, seed=0):
    """The last input's first feature plus half the one before (issue 13's exploding RNN task)."""
    rng = np.random.RandomState(seed)
    x = rng.randn(count, length, 4).astype("float32")
    return x, (x[:, -1, 0] + 0.5 * x[:, -2, 0]).astype("float32")[:, None]


def _tokens(count=2048, length=20, vocab=200, seed=0):
    """Are there more tokens below 50 than above 150? `[N, length]` int32."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, vocab, (count, length)).astype("int32")
    return x, ((x < 50).sum(axis=1) > (x >= 150).sum(axis=1)).astype("int32")


DATA = {
    "digits": _digits,
    "digits_raw": lambda: _digits(raw=True),
    "digits_images": _digits_images,
    "digits_rgb32": _digits_rgb32,
    "sequences": _sequences,
    "long_sequences": _long_sequences,
    "long_regression": _long_regression,
    "tokens": _tokens,
}


# ---------------------------------------------------------------------------
# Models, written as tutorials write them.


def _keras():
    import keras

    return keras


def mlp(depth, width, activation="relu", init="he_normal", bias_init="zeros", classes=10, inputs=64,
        dropout=0.0):
    keras = _keras()
    layers = [keras.Input((inputs,))]
    for _ in range(depth):
        layers.append(keras.layers.Dense(width, activation=activation, kernel_initializer=init,
                                         bias_initializer=bias_init))
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    return keras.Sequential(layers)


def mlp_batchnorm(depth=4, width=64):
    """Dense (with its default bias) -> BatchNormalization -> ReLU: the bias is removed by the normalisation."""
    keras = _keras()
    layers = [keras.Input((64,))]
    for _ in range(depth):
        layers += [keras.layers.Dense(width), keras.layers.BatchNormalization(), keras.layers.ReLU()]
    layers.append(keras.layers.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def mlp_residual(blocks=4, width=64):
    keras = _keras()
    inputs = keras.Input((64,))
    x = keras.layers.Dense(width, activation="relu", kernel_initializer="he_normal")(inputs)
    for _ in range(blocks):
        h = keras.layers.Dense(width, activation="relu", kernel_initializer="he_normal")(x)
        h = keras.layers.Dense(width, kernel_initializer="he_normal")(h)
        x = keras.layers.ReLU()(keras.layers.Add()([x, h]))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def cnn(batch_norm=False, activation="relu", init="he_normal", depth=2, filters=16, pool=True):
    keras = _keras()
    layers = [keras.Input((8, 8, 1))]
    for i in range(depth):
        if batch_norm:  # Conv2D keeps its default bias, as most tutorials write it
            layers += [keras.layers.Conv2D(filters, 3, padding="same", kernel_initializer=init),
                       keras.layers.BatchNormalization(), keras.layers.Activation(activation)]
        else:
            layers.append(keras.layers.Conv2D(filters, 3, padding="same", activation=activation,
                                              kernel_initializer=init))
        if pool and i < 2:
            layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")]
    return keras.Sequential(layers)


def mobilenet():
    keras = _keras()
    return keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=10)


def recurrent(kind, units=32, length=20, activation="tanh", recurrent_gain=None, regression=False):
    keras = _keras()
    cell = getattr(keras.layers, kind)
    kwargs = {}
    if recurrent_gain is not None:
        kwargs["recurrent_initializer"] = keras.initializers.Orthogonal(gain=recurrent_gain)
    if kind == "SimpleRNN":
        kwargs["activation"] = activation
    head = keras.layers.Dense(1) if regression else keras.layers.Dense(2, activation="softmax")
    return keras.Sequential([keras.Input((length, 4)), cell(units, **kwargs), head])


def embedding_pooling():
    keras = _keras()
    return keras.Sequential([keras.Input((20,), dtype="int32"), keras.layers.Embedding(200, 16),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(2, activation="softmax")])


def transformer(width=32, heads=4):
    """One encoder block: token and position embeddings, attention, LayerNorm, a feed-forward net."""
    keras = _keras()
    import keras.ops as ops

    inputs = keras.Input((20,), dtype="int32")
    x = keras.layers.Embedding(200, width)(inputs)
    positions = keras.layers.Embedding(20, width)(ops.arange(20))
    x = x + positions
    attention = keras.layers.MultiHeadAttention(heads, width // heads)(x, x)
    x = keras.layers.LayerNormalization()(keras.layers.Add()([x, attention]))
    h = keras.layers.Dense(2 * width, activation="relu")(x)
    h = keras.layers.Dense(width)(h)
    x = keras.layers.LayerNormalization()(keras.layers.Add()([x, h]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def warmup(peak, steps=50):
    """A linear learning-rate warm-up to `peak` over `steps`, then constant."""
    keras = _keras()

    class Warmup(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return peak * keras.ops.minimum(1.0, (keras.ops.cast(step, "float32") + 1.0) / steps)

        def get_config(self):
            return {}

    return Warmup()


def ratio_loss(y_true, y_pred):
    """A hand-written cross-entropy on ReLU outputs: log(p_true / sum p), 0/0 once a row is all 0."""
    keras = _keras()
    ops = keras.ops
    true = ops.sum(ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), 10) * y_pred, axis=-1)
    return -ops.mean(ops.log(true / ops.sum(y_pred, axis=-1)))


def _opt(name, lr, **kwargs):
    return lambda: getattr(_keras().optimizers, name)(lr, **kwargs)


def _init(name, **kwargs):
    return lambda: getattr(_keras().initializers, name)(**kwargs)


def _cases():
    k = _keras
    healthy = [
        Case("mlp_relu_he_sgd", "healthy", lambda: mlp(4, 64), "digits", _opt("SGD", 0.05, momentum=0.9),
             fast=True),
        Case("mlp_selu_lecun_adam", "healthy", lambda: mlp(6, 64, "selu", "lecun_normal"), "digits",
             _opt("Adam", 1e-3)),
        Case("mlp_bn_sgd", "healthy", mlp_batchnorm, "digits", _opt("SGD", 0.05, momentum=0.9), fast=True),
        Case("mlp_residual_adam", "healthy", mlp_residual, "digits", _opt("Adam", 1e-3)),
        Case("mlp_gelu_adamw_warmup", "healthy", lambda: mlp(4, 64, "gelu"), "digits",
             lambda: k().optimizers.AdamW(warmup(2e-3), weight_decay=1e-2)),
        Case("mlp_sigmoid_shallow_sgd", "healthy", lambda: mlp(2, 64, "sigmoid", "glorot_uniform"), "digits",
             _opt("SGD", 0.5)),
        Case("mlp_leaky_dropout_adam", "healthy", lambda: mlp(4, 64, "leaky_relu", dropout=0.2), "digits",
             _opt("Adam", 1e-3)),
        Case("mlp_elu_rmsprop", "healthy", lambda: mlp(4, 64, "elu"), "digits", _opt("RMSprop", 1e-3)),
        Case("cnn_adam", "healthy", lambda: cnn(), "digits_images", _opt("Adam", 1e-3)),
        Case("cnn_bn_sgd", "healthy", lambda: cnn(batch_norm=True, depth=3), "digits_images",
             _opt("SGD", 0.05, momentum=0.9)),
        Case("mobilenet_adam", "healthy", mobilenet, "digits_rgb32", _opt("Adam", 1e-3)),
        Case("lstm_adam", "healthy", lambda: recurrent("LSTM"), "sequences", _opt("Adam", 3e-3)),
        Case("gru_rmsprop", "healthy", lambda: recurrent("GRU"), "sequences", _opt("RMSprop", 1e-3)),
        Case("simple_rnn_short_adam", "healthy", lambda: recurrent("SimpleRNN", length=20), "sequences",
             _opt("Adam", 1e-3)),
        Case("embedding_pooling_adam", "healthy", embedding_pooling, "tokens", _opt("Adam", 3e-3), fast=True),
        Case("transformer_adamw_warmup", "healthy", transformer, "tokens",
             lambda: k().optimizers.AdamW(warmup(1e-3), weight_decay=1e-2), fast=True),
    ]
    sick = [
        Case("vanishing_sigmoid_deep_sgd", "vanishing", lambda: mlp(10, 64, "sigmoid", "glorot_uniform"),
             "digits", _opt("SGD", 0.1), remedy="relu_he", fast=True),
        Case("vanishing_sigmoid_deep_adam", "vanishing", lambda: mlp(12, 32, "sigmoid", "glorot_uniform"),
             "digits", _opt("Adam", 1e-3), remedy="relu_he"),
        Case("vanishing_tanh_small_init", "vanishing", lambda: mlp(8, 32, "tanh", _init("RandomNormal", stddev=0.02)()),
             "digits", _opt("SGD", 0.05), remedy="scaled_init"),
        Case("vanishing_sigmoid_cnn", "vanishing",
             lambda: cnn(activation="sigmoid", init="glorot_uniform", depth=6, pool=False),
             "digits_images", _opt("SGD", 0.1), remedy="relu_he"),
        Case("exploding_simple_rnn", "exploding",
             lambda: recurrent("SimpleRNN", units=64, length=60, recurrent_gain=1.5, regression=True),
             "long_regression", _opt("SGD", 0.2), loss="mse", accept=("nonfinite",), remedy="gating"),
        Case("exploding_linear_rnn", "exploding",
             lambda: recurrent("SimpleRNN", units=16, length=60, activation="linear", recurrent_gain=1.2),
             "long_sequences", _opt("SGD", 0.01), accept=("nonfinite",), remedy="gating"),
        Case("nonfinite_lstm_high_lr", "nonfinite", lambda: recurrent("LSTM", length=60, regression=True),
             "long_regression", _opt("SGD", 5.0), loss="mse", accept=("exploding",), remedy="lower_lr"),
        Case("exploding_relu_large_init", "exploding",
             lambda: mlp(8, 64, init=_init("RandomNormal", stddev=0.5)()), "digits", _opt("SGD", 0.01),
             accept=("nonfinite",), remedy="scaled_init"),
        # Its explosion at the first steps kills every ReLU unit within ten: dead is its cause's mark too.
        Case("exploding_cnn_large_init", "exploding",
             lambda: cnn(depth=4, init=_init("RandomNormal", stddev=1.0)(), pool=False), "digits_images",
             _opt("SGD", 0.01), accept=("nonfinite", "dead"), remedy="scaled_init"),
        Case("dead_relu_adam_high_lr", "dead", lambda: mlp(4, 128), "digits", _opt("Adam", 0.05),
             remedy="lower_lr"),
        Case("dead_negative_bias", "dead", lambda: mlp(4, 64, bias_init=_init("Constant", value=-2.0)()),
             "digits", _opt("Adam", 1e-3), remedy="leaky", fast=True),
        Case("dead_cnn_sgd_high_lr", "dead", lambda: cnn(depth=3), "digits_images",
             _opt("SGD", 0.5, momentum=0.9), remedy="lower_lr"),
        Case("saturated_sigmoid_large_init", "saturated",
             lambda: mlp(3, 64, "sigmoid", _init("RandomNormal", stddev=2.0)()), "digits", _opt("SGD", 0.1),
             remedy="scaled_init"),
        Case("saturated_tanh_raw_inputs", "saturated", lambda: mlp(3, 64, "tanh", "glorot_uniform"),
             "digits_raw", _opt("SGD", 0.01), remedy="scale_inputs"),
        Case("nonfinite_bad_loss", "nonfinite", lambda: _ratio_model(), "digits", _opt("Adam", 1e-2),
             loss=ratio_loss, remedy="check_data", fast=True),
        Case("nonfinite_high_lr", "nonfinite", lambda: mlp(3, 64), "digits", _opt("SGD", 20.0),
             accept=("exploding",), remedy="lower_lr"),
    ]
    return healthy + sick


def _ratio_model():
    keras = _keras()
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10, activation="relu")])


CASES = {case.name: case for case in _cases()}


# ---------------------------------------------------------------------------
# The independent measurement.


def _activation_layers(model):
    """`[(layer, activation name)]` for layers whose output is a ReLU-family, sigmoid or tanh activation."""
    out = []
    for layer in _leaves(model):
        name = None
        activation = getattr(layer, "activation", None)
        if activation is not None and not isinstance(layer, _keras().layers.RNN):
            name = getattr(activation, "__name__", "").lower()
        elif type(layer).__name__ == "ReLU":
            name = "relu6" if getattr(layer, "max_value", None) == 6 else "relu"
        if name in ("relu", "relu6", "elu", "selu", "sigmoid", "tanh"):
            out.append((layer, name))
    return out


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, _keras().Model):
            yield from _leaves(layer)
        else:
            yield layer


def _no_gradient(name, a):
    """Where the activation's derivative is (almost) 0: dead for every sample counts as dead."""
    if name == "relu":
        return a <= 0
    if name == "relu6":
        return (a <= 0) | (a >= 6)
    # ELU/SELU: derivative exp(x) (times the scale) below 1e-3 of the positive slope: x < log(1e-3).
    floor = -1.0 if name == "elu" else -1.7580993408473766
    return a <= floor * (1.0 - 1e-3)


def _saturated(name, a):
    if name == "sigmoid":
        return (a < 0.01) | (a > 0.99)
    return np.abs(a) > 0.99


class Probe:
    """Measures a model on a fixed batch: `GradientTape` gradients and activations, outside keras-vg."""

    def __init__(self, model, x, y, loss):
        keras = _keras()
        self.model, self.x, self.y = model, x, y
        self.loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        self.layers = _activation_layers(model)
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self.activations = keras.Model(inputs, [layer.output for layer, _ in self.layers]) if self.layers else None
        self.kernels = [(layer.name, [v for v in layer.trainable_weights if len(v.shape) >= 2])
                        for layer in _leaves(model)]
        self.kernels = [(name, vs) for name, vs in self.kernels if vs]
        self.output_layer = _leaves_list(model)[-1].name

    def __call__(self):
        import tensorflow as tf

        keep = [v.numpy() for v in self.model.non_trainable_variables]  # BatchNorm's moving statistics
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self.loss(self.y, self.model(self.x, training=True)))
        variables = [v for _, vs in self.kernels for v in vs]
        grads = tape.gradient(loss, self.model.trainable_variables)
        by_id = {id(v): g for v, g in zip(self.model.trainable_variables, grads)}
        layer_norms = {}
        for name, vs in self.kernels:
            layer_norms[name] = float(np.sqrt(sum(np.sum(np.square(_dense(by_id[id(v)]))) for v in vs
                                                  if by_id.get(id(v)) is not None)))
        all_grads = [_dense(g) for g in grads if g is not None]
        global_norm = float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in all_grads)))
        finite = bool(np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in all_grads))
        dead, saturated = {}, {}
        if self.activations is not None:
            values = self.activations(self.x, training=True)
            values = values if isinstance(values, (list, tuple)) else [values]
            for (layer, name), a in zip(self.layers, values):
                a = np.asarray(a)
                if name in ("sigmoid", "tanh"):
                    if layer.name != self.output_layer:  # an output layer saturates by design
                        saturated[layer.name] = float(_saturated(name, a).mean())
                elif layer.name != self.output_layer:
                    axes = tuple(range(a.ndim - 1))
                    dead[layer.name] = float(np.all(_no_gradient(name, a), axis=axes).mean())
        for v, value in zip(self.model.non_trainable_variables, keep):
            v.assign(value)
        del variables
        return {"loss": float(loss), "finite": finite, "global_norm": global_norm, "layer_norms": layer_norms,
                "dead": dead, "saturated": saturated}


def _leaves_list(model):
    return list(_leaves(model))


def _dense(gradient):
    import tensorflow as tf

    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    return np.asarray(gradient, np.float64)


def truth(probes, loss_history):
    """What the probes show: the sick signs seen, and whether the model trained.

    Args:
        probes: `[(step, measurement)]`, `Probe()`'s dicts in step order.
        loss_history: Fit's per-epoch training losses.

    Returns:
        A dict: `signs` (sorted kinds from `SICK_KINDS`), `trained`, and the
        figures behind them.
    """
    signs = set()
    finite = [p for _, p in probes if p["finite"]]
    if len(finite) < len(probes) or not all(math.isfinite(v) for v in loss_history):
        signs.add("nonfinite")
    # An explosion's last finite norm often comes with an infinite loss: count every finite norm.
    ratios, norms = [], [p["global_norm"] for _, p in probes if math.isfinite(p["global_norm"])]
    for p in finite:
        layer = list(p["layer_norms"].values())
        if len(layer) >= 2 and max(layer) > 0:
            ratios.append(min(layer) / max(layer))
    if ratios and np.mean(np.array(ratios) < TRUTH_VANISHING_RATIO) > TRUTH_MAJORITY:
        signs.add("vanishing")
    if norms and (max(norms) > TRUTH_EXPLODING_NORM or max(norms) > TRUTH_EXPLODING_GROWTH * norms[0]):
        signs.add("exploding")
    for key, kind, limit in (("dead", "dead", TRUTH_DEAD_FRACTION),
                             ("saturated", "saturated", TRUTH_SATURATED_FRACTION)):
        worst = [max(p[key].values(), default=0.0) for p in finite]
        if worst and np.mean(np.array(worst) >= limit) > TRUTH_MAJORITY:
            signs.add(kind)
    losses = [p["loss"] for _, p in probes]
    trained = bool(len(losses) > 1 and math.isfinite(losses[-1]) and losses[-1] < TRUTH_TRAINED * losses[0])
    return {
        "signs": sorted(signs),
        "trained": trained,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "min_layer_ratio": float(np.median(ratios)) if ratios else None,
        "max_global_norm": max(norms) if norms else None,
        "max_dead": max((max(p["dead"].values(), default=0.0) for p in finite), default=0.0),
        "max_saturated": max((max(p["saturated"].values(), default=0.0) for p in finite), default=0.0),
    }


# ---------------------------------------------------------------------------
# Recording.


def record(case, log_dir, seed=0):
    """Trains `case` with a `GradientMonitor(every=1)` into `log_dir`; returns its measured truth."""
    keras = _keras()
    import keras_vg

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    x, y = DATA[case.data]()
    probe_x, probe_y = x[:PROBE_SIZE], y[:PROBE_SIZE]
    model = case.build()
    model.compile(optimizer=case.optimizer(), loss=case.loss)
    probe = Probe(model, probe_x, probe_y, case.loss)
    probes = []

    class Probing(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            step = int(self.model.optimizer.iterations)
            if step % PROBE_EVERY == 0:
                probes.append((step, probe()))

    steps_per_epoch = len(x) // case.batch_size
    epochs = math.ceil(case.steps / steps_per_epoch)
    monitor = keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0)
    started = time.perf_counter()
    history = model.fit(x, y, batch_size=case.batch_size, epochs=epochs, verbose=0, callbacks=[Probing(), monitor])
    probes.append((int(model.optimizer.iterations), probe()))
    monitor.close()
    result = truth(probes, history.history.get("loss", []))
    result["seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(log_dir, "truth.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------------------
# Judging at a cadence.


class Subsampled:
    """A run as `GradientMonitor(every=k)` would have written it, from one recorded with `every=1`.

    Records are kept at steps that are multiples of `every`. Non-finite
    steps between two kept records become the `nonfinite` events the monitor
    writes for them (format 1.2): one per stretch, from its first to its last
    step.
    """

    def __init__(self, run, every):
        self.run, self.every, self.log_dir = run, every, run.log_dir

    def stats(self):
        return self.run.stats()

    def stat(self, name):
        steps, names, values = self.run.stat(name)
        keep = steps % self.every == 0
        return steps[keep], names, values[keep]

    def model(self):
        return self.run.model()

    def events(self):
        events = list(self.run.events())
        if self.every > 1 and "global_grad_norm" in self.run.stats():
            steps, _, norm = self.run.stat("global_grad_norm")
            bad = steps[~np.isfinite(norm) & (steps % self.every != 0)]
            for stretch in np.split(bad, np.flatnonzero(np.diff(bad // self.every) != 0) + 1) if bad.size else ():
                events.append({"kind": "nonfinite", "step": int(stretch[0]), "last_step": int(stretch[-1]),
                               "source": "loss", "message": f"non-finite loss at steps {stretch[0]}-{stretch[-1]}"})
        return sorted(events, key=lambda e: e["step"])

    def diagnose(self, thresholds=None):
        from keras_vg.diagnosis import diagnose

        return diagnose(self, thresholds)


def _followed(summary):
    """The remedies this model already follows, which a finding must not suggest."""
    layers = summary.get("layers", []) if summary else []
    classes = {entry["class"] for entry in layers}
    inits = {entry.get("kernel_initializer") for entry in layers if entry.get("kernel_initializer")}
    out = set()
    if summary and summary.get("has_batch_norm"):
        out.add("batch_norm")
    if classes & {"LSTM", "GRU"} and "SimpleRNN" not in classes:
        out.add("gating")
    if inits and inits <= {"HeNormal", "HeUniform"}:
        out.add("he_init")
    if summary and summary.get("has_residual_add"):
        out.add("residual")
    return out


def judge(case, run, every, thresholds=None):
    """keras-vg's verdict on `case` at one cadence (with `thresholds`, or the defaults).

    Returns:
        A dict: `kinds` (the finding kinds), `ok` (the case's target met),
        `remedies` (of the finding of its cause), `notes` (structural zeros
        and other information) and `diagnosis`.
    """
    diagnosis = Subsampled(run, every).diagnose(thresholds)
    kinds = sorted(diagnosis.kinds)
    notes = [note.text for note in getattr(diagnosis, "notes", ())]
    if case.cause == "healthy":
        return {"kinds": kinds, "ok": not kinds, "remedies": [], "notes": notes, "diagnosis": diagnosis}
    found = [f for f in diagnosis.findings if f.kind in case.causes]
    remedies = [r.key for f in found for r in f.remedies]
    wrong = sorted(set(remedies) & _followed(run.model()))
    ok = bool(found) and case.remedy in remedies and not wrong
    return {"kinds": kinds, "ok": ok, "remedies": remedies, "wrong_remedies": wrong, "notes": notes,
            "diagnosis": diagnosis}


def evaluate(names, log_dir, cadences=CADENCES, reuse=False, out=sys.stdout, thresholds=None):
    """Records (unless `reuse`) and judges the named cases; prints the table; returns the results."""
    from keras_vg.reader import read_run

    results = {}
    for name in names:
        case = CASES[name]
        run_dir = os.path.join(log_dir, name)
        truth_path = os.path.join(run_dir, "truth.json")
        if reuse and os.path.exists(truth_path):
            with open(truth_path) as f:
                measured = json.load(f)
        else:
            if os.path.isdir(run_dir):
                import shutil

                shutil.rmtree(run_dir)
            os.makedirs(run_dir)
            measured = record(case, run_dir)
        run = read_run(run_dir)
        results[name] = (case, measured, {every: judge(case, run, every, thresholds) for every in cadences})
        print(_row(case, measured, results[name][2], cadences), file=out, flush=True)
    return results


def margins(run, every):
    """How close a run came to each rule: the extreme figure each measured, whether or not it fired.

    Each figure is what `detect` computes for its rule, with the other rules
    switched off and the rule's own threshold at its extreme, so that it
    fires everywhere and reports its figure in every cell it judges.

    Returns:
        A dict: `vanishing` (the smallest layer norm over the step's
        largest), `spike` (the largest norm over its usual level, after
        `min_history` records), `norm` (the largest layer norm), `update`
        (the largest kernels' update ratio, after `min_history` records),
        `dead` and `saturated` (the largest fractions the rules judge),
        `zero` (the largest ratio of a structural zero to its kernels) and
        `bias` (the smallest such ratio of any other bias, scale or offset).
    """
    from keras_vg import detect
    from keras_vg.detect.classification import _ratios_to_kernels

    sub = Subsampled(run, every)
    off = {"exploding_norm": None, "exploding_update_ratio": None, "spike_factor": 1e30,
           "vanishing_ratio": 1e-30, "dead_fraction": 1.0, "saturation_fraction": 1.0}

    def extreme(rule, reduce, **fire):
        result = detect.classify(sub, detect.Thresholds(**dict(off, **fire)))
        figures = []
        for grid in (result.variables, result.layers):
            figures.append(grid.figures[grid.rules == detect.RULE_NAMES.index(rule)])
        figures = np.concatenate(figures)
        figures = figures[np.isfinite(figures)]
        return float(reduce(figures)) if figures.size else None

    zeros = detect.zero_gradients(sub)
    structural = {z["variable"] for z in zeros if z["reason"]}
    steps, names, norm = sub.stat("grad_norm")
    structure = detect.Structure(names, sub.model())
    ratios = _ratios_to_kernels(structure, norm, 1)
    others = [r for n, r in zip(names, ratios) if n not in structural and np.isfinite(r)]
    layer_norms = structure.unit_norms(norm)
    layer_norms = layer_norms[np.isfinite(layer_norms)]
    return {
        "vanishing": extreme("vanishing", np.min, vanishing_ratio=1 - 1e-7),
        "spike": extreme("spike", np.max, spike_factor=1 + 1e-7),
        "norm": float(layer_norms.max()) if layer_norms.size else None,
        "update": extreme("update_ratio", np.max, exploding_update_ratio=1e-30),
        "dead": extreme("dead", np.max, dead_fraction=1e-9),
        "saturated": extreme("saturated", np.max, saturation_fraction=1e-9),
        "zero": max((z["ratio"] for z in zeros if z["reason"] and z["ratio"] is not None), default=None),
        "bias": min(others, default=None),
    }


def truth_holds(case, measured):
    """Whether the independent measurement confirms the case: healthy and trained, or sick of its cause."""
    if case.cause == "healthy":
        return measured["trained"] and not measured["signs"]
    return bool(set(case.causes) & set(measured["signs"]))


def _row(case, measured, verdicts, cadences):
    cells = [case.name, case.cause, ", ".join(measured["signs"]) or "-",
             "yes" if truth_holds(case, measured) else "**NO**"]
    for every in cadences:
        verdict = verdicts[every]
        text = ", ".join(verdict["kinds"]) or "none"
        cells.append(text if verdict["ok"] else f"**{text}**")
    return "| " + " | ".join(cells) + " |"


def header(cadences):
    cells = ["case", "cause", "measured (tape)", "truth holds"] + [f"every={k}" for k in cadences]
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def summary_lines(results, cadences):
    lines = []
    for every in cadences:
        healthy = [(c, v[every]) for c, _, v in results.values() if c.cause == "healthy"]
        sick = [(c, v[every]) for c, _, v in results.values() if c.cause != "healthy"]
        alarms = sum(1 for _, v in healthy if not v["ok"])
        found = sum(1 for _, v in sick if v["ok"])
        lines.append(f"every={every}: false alarms {alarms}/{len(healthy)} healthy; "
                     f"right cause and fitting remedy {found}/{len(sick)} sick")
    return lines


def _thresholds(settings):
    """`Thresholds` with `NAME=VALUE` fields changed, or None for the defaults."""
    from keras_vg import detect

    if not settings:
        return None
    fields = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        fields[name] = None if value == "None" else (int(value) if value.lstrip("-").isdigit() else float(value))
    return detect.Thresholds(**fields)


MARGIN_COLUMNS = (("vanishing", ".1e"), ("spike", ".3g"), ("norm", ".3g"), ("update", ".2g"), ("dead", ".0%"),
                  ("saturated", ".0%"), ("zero", ".0e"), ("bias", ".0e"))


def print_margins(results, log_dir, cadences):
    """The table of `margins`, one row per case and cadence."""
    from keras_vg.reader import read_run

    print("\n| case | every | " + " | ".join(name for name, _ in MARGIN_COLUMNS) + " |")
    print("|---|---|" + "---|" * len(MARGIN_COLUMNS))
    for name, (case, _, _) in results.items():
        run = read_run(os.path.join(log_dir, name))
        for every in cadences:
            m = margins(run, every)
            cells = ["-" if m[key] is None else format(m[key], spec) for key, spec in MARGIN_COLUMNS]
            print(f"| {name} ({case.cause}) | {every} | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR)
    parser.add_argument("--cadences", nargs="+", type=int, default=list(CADENCES))
    parser.add_argument("--reuse", action="store_true", help="judge runs recorded before instead of training")
    parser.add_argument("--verbose", action="store_true", help="print every case's report")
    parser.add_argument("--margins", action="store_true",
                        help="also print how close each run came to each rule (the sources of the thresholds)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="judge with this keras_vg.detect.Thresholds field changed (an ablation), e.g. "
                             "--set min_records=1")
    args = parser.parse_args(argv)
    thresholds = _thresholds(args.set)
    print(header(args.cadences))
    results = evaluate(args.cases, args.log_dir, tuple(args.cadences), reuse=args.reuse, thresholds=thresholds)
    print()
    print("\n".join(summary_lines(results, args.cadences)))
    if args.margins:
        print_margins(results, args.log_dir, args.cadences)
    for case, measured, verdicts in results.values():
        missed = [k for k, v in verdicts.items() if not v["ok"]]
        if missed or args.verbose or not truth_holds(case, measured):
            print(f"\n== {case.name} ({case.cause}; measured {measured}); missed at every={missed}")
            print(verdicts[missed[0] if missed else args.cadences[0]]["diagnosis"].text(max_findings=6))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
