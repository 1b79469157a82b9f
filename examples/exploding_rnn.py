"""Exploding gradients in a recurrent network, found by the monitor and tamed by keras_vg.AutoClip.

A linear SimpleRNN learns to output the last input of a sequence plus half
the one before. It trains on a curriculum: each epoch, 40 batches of short
sequences (10 steps, zero-padded to 80), then 24 batches of 80 steps. Its
recurrent matrix (orthogonal, gain 1.1) multiplies a gradient by up to
1.1**80 ~ 2000 over a long sequence: the first long batch (step 40, after
ZClip's 25 warm-up steps) brings a gradient about 1e5 times the usual one.
With SGD at 0.005:

- `none`: no clipping. The weights blow up, the loss is NaN; the diagnosis
  reports exploding, then non-finite gradients, and suggests AutoClip.
- `clipnorm`: the optimizer's fixed `global_clipnorm=1.0`, for reference.
- `autoclip`: `keras_vg.AutoClip()`, the default policy (ZClip's z-score):
  clipping switches on at the first long batch and the model learns.
- `autoclip_percentile`: `keras_vg.AutoClip(policy="percentile")`.

The monitor records the gradients before clipping, so a clipped run still
shows the explosion; AutoClip's records and events, written into the same run
(`GradientMonitor` and `AutoClip` in one `callbacks` list), show what it did.
No data to download.

    python examples/exploding_rnn.py                 # about 20 s on 2 CPU cores
    python examples/exploding_rnn.py --epochs 1      # a quick smoke run
    keras-vg report logs/exploding_rnn/autoclip
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vg  # noqa: E402

BATCH = 32
LENGTH = 80
SHORT = 10
SHORT_BATCHES, LONG_BATCHES = 40, 24
LEARNING_RATE = 0.005
VARIANTS = ("none", "clipnorm", "autoclip", "autoclip_percentile")


def make_data(batches=(SHORT_BATCHES, LONG_BATCHES), seed=0):
    """`(x, y)`: `batches[0]` batches of short sequences, then `batches[1]` of long ones, in that order.

    Args:
        batches: `(short, long)` numbers of batches of `BATCH` sequences.
        seed: The random seed.

    Returns:
        `x` float32 `[N, LENGTH, 1]`, standard normal (zero before the last
        `SHORT` steps of a short sequence); `y` float32 `[N, 1]`, the last
        input plus half the one before.
    """
    short, long = batches
    x = np.random.RandomState(seed).randn((short + long) * BATCH, LENGTH, 1).astype("float32")
    x[: short * BATCH, : LENGTH - SHORT] = 0.0
    return x, (x[:, -1] + 0.5 * x[:, -2]).astype("float32")


def clipping_for(variant):
    """`(optimizer keyword arguments, extra callbacks)` of a variant."""
    if variant == "clipnorm":
        return {"global_clipnorm": 1.0}, []
    if variant == "autoclip":
        return {}, [keras_vg.AutoClip(verbose=0)]
    if variant == "autoclip_percentile":
        return {}, [keras_vg.AutoClip(policy="percentile", verbose=0)]
    return {}, []


def train(variant, data, epochs, log_dir):
    """Trains one variant; returns `(validation loss, peak pre-clip global norm, Run)`."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = data
    model = keras.Sequential([
        keras.Input((LENGTH, 1)),
        keras.layers.SimpleRNN(8, activation="linear", use_bias=False,
                               recurrent_initializer=keras.initializers.Orthogonal(gain=1.1)),
        keras.layers.Dense(1, use_bias=False),  # the target has no offset
    ])
    optimizer_kwargs, callbacks = clipping_for(variant)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, **optimizer_kwargs), loss="mse")
    monitor = keras_vg.GradientMonitor(log_dir=log_dir, every=1, verbose=0)
    # shuffle=False keeps the curriculum: short sequences first in every epoch.
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[monitor] + callbacks)
    loss = model.evaluate(x_val, y_val, verbose=0)
    run = keras_vg.read_run(log_dir)
    _, _, global_norm = run.stat("global_grad_norm")
    finite = global_norm[np.isfinite(global_norm)]
    return loss, float(finite.max()) if finite.size else float("nan"), run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="logs/exploding_rnn", help="one run per variant below it")
    parser.add_argument("--epochs", type=int, default=2,
                        help=f"epochs per variant, {SHORT_BATCHES + LONG_BATCHES} steps each (default: 2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)

    data = make_data(), make_data((0, 8), seed=1)  # validation: long sequences only
    baseline = float(np.mean(data[1][1] ** 2))
    print(f"\nLinear SimpleRNN(8), recurrent gain 1.1, SGD({LEARNING_RATE}), {args.epochs} epoch(s) of "
          f"{SHORT_BATCHES} short then {LONG_BATCHES} long batches")
    print(f"validation loss (MSE on long sequences); predicting 0 scores {baseline:.3g}")
    print(f"{'variant':<20} {'val loss':>9}  {'peak norm':>9}  {'clip on':>7}  {'clipped':>7}  "
          f"{'skipped':>7}  findings")
    reports = []
    for variant in args.variants:
        loss, peak, run = train(variant, data, args.epochs, os.path.join(args.log_dir, variant))
        diagnosis = run.diagnose()
        clip = diagnosis.clipping
        on = str(clip.switched_on[0]) if clip is not None and clip.switched_on else "-"
        clipped, skipped = (str(clip.clipped), str(clip.skipped)) if clip is not None else ("-", "-")
        kinds = ", ".join(sorted(diagnosis.kinds)) or "none"
        print(f"{variant:<20} {loss:>9.3g}  {peak:>9.3g}  {on:>7}  {clipped:>7}  {skipped:>7}  {kinds}")
        if variant in ("none", "autoclip"):
            reports.append(diagnosis)
    for diagnosis in reports:
        print()
        print(diagnosis.text(max_findings=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
