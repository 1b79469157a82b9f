"""Speed of the region rules: `StreamingDetector.observe` against `observe_many`, and `classify`.

For each batch shape (T records x N variables) two detectors, warmed up on the
same records, are fed the same new batches, round after round: one calls
`observe` once per record, the other `observe_many` once per batch. The arms
alternate within each round, and each keeps its fastest round. The data look
like a deep network partly vanishing (norms falling geometrically over the
variables), with rare spikes, NaN counts, update ratios, 20 layers'
`dead_fraction` and the global norm, so every rule does real work. Then
`classify` runs on 1,000 variables x 20,000 steps of `grad_norm` (fastest of
`--rounds // 2` runs, at least 2).

Targets: `observe_many` on 50 x 50 well under 5 ms, on 50 x 1000 under 20 ms.

With `--against REV`, it instead times this checkout's `keras_vg.detect`
against the one at git revision REV (a module or, since the split, a
package), loaded into the same process: the
same batches go to one detector of each version, alternating which runs
first, and each line gives both fastest times and the median of the paired
ratios (this checkout over REV), the only comparison the shared machine's
drift does not blur.

Usage:

    .venv/bin/python benchmarks/detect_speed.py [--rounds 9] [--shapes 50x50,50x1000,200x1000]
    .venv/bin/python benchmarks/detect_speed.py --against 823b567

It prints one line per shape.
"""

import argparse
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vg.detect import StreamingDetector, classify  # noqa: E402

LAYERS = 20


def make_records(rng, steps, n):
    """Synthetic records: `(steps [S], values {stat: [S, ...]}, names)`."""
    names = [f"dense_{i // 2}/{('kernel', 'bias')[i % 2]}" for i in range(n)]
    layers = [f"dense_{i}" for i in range(LAYERS)]
    norms = rng.lognormal(0.0, 0.3, (steps, n)) * np.geomspace(1e-5, 1.0, n)
    norms[rng.random((steps, n)) < 0.002] *= 200  # spikes
    count = np.zeros((steps, n))
    count[rng.random((steps, n)) < 0.0005] = 3
    values = {
        "grad_norm": norms.astype(np.float32),
        "grad_nonfinite": count.astype(np.float32),
        "update_ratio": (1e-3 * rng.lognormal(0.0, 0.5, (steps, n))).astype(np.float32),
        "dead_fraction": (rng.random((steps, LAYERS)) ** 6).astype(np.float32),
        "global_grad_norm": np.sqrt((norms**2).sum(axis=1)).astype(np.float32),
    }
    names = {
        "grad_norm": names, "grad_nonfinite": names, "update_ratio": names,
        "dead_fraction": layers, "global_grad_norm": [],
    }
    return np.arange(steps), values, names


def one_by_one(detector, steps, values, names):
    started = []
    for t, step in enumerate(steps):
        row = {s: (float(v[t]) if v.ndim == 1 else v[t]) for s, v in values.items()}
        started += detector.observe(int(step), row, names)
    return started


def batched(detector, steps, values, names):
    return detector.observe_many(steps, values, names)


def bench_streaming(T, n, rounds, rng):
    warmup = 40
    steps, values, names = make_records(rng, warmup + T * (rounds + 1), n)
    arms = {"observe": one_by_one, "observe_many": batched}
    detectors = {arm: StreamingDetector() for arm in arms}
    head = {s: v[:warmup] for s, v in values.items()}
    for arm, feed in arms.items():
        feed(detectors[arm], steps[:warmup], head, names)
    best = dict.fromkeys(arms, np.inf)
    for r in range(rounds + 1):  # round 0 warms the code paths
        rows = slice(warmup + r * T, warmup + (r + 1) * T)
        batch = {s: v[rows] for s, v in values.items()}
        order = list(arms) if r % 2 else list(arms)[::-1]
        started = {}
        for arm in order:
            t0 = time.perf_counter()
            started[arm] = arms[arm](detectors[arm], steps[rows], batch, names)
            elapsed = time.perf_counter() - t0
            if r:
                best[arm] = min(best[arm], elapsed)
        assert [e.message for e in started["observe"]] == [e.message for e in started["observe_many"]]
    return best


def bench_classify(rounds, rng):
    norms = (rng.random((20000, 1000), dtype=np.float32) + 0.5)
    names = [f"dense_{i}/kernel" for i in range(1000)]
    stats = {"grad_norm": (np.arange(20000), names, norms)}
    best = np.inf
    for _ in range(max(2, rounds // 2)):
        t0 = time.perf_counter()
        classify(stats)
        best = min(best, time.perf_counter() - t0)
    return best


def detect_at(revision):
    """`keras_vg.detect` as it was at a git revision, imported beside this checkout's.

    The revision's `keras_vg/` is unpacked into a temporary folder and imported
    while this checkout's modules are set aside; its modules keep references
    to each other, so it runs on its own once this checkout's are back.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(["git", "archive", revision, "keras_vg"], capture_output=True, check=True,
                             cwd=root).stdout
    folder = tempfile.mkdtemp()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")

    def ours():
        return [name for name in sys.modules if name == "keras_vg" or name.startswith("keras_vg.")]

    saved = {name: sys.modules.pop(name) for name in ours()}
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module("keras_vg.detect")
    finally:
        sys.path.remove(folder)
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)
        shutil.rmtree(folder)
    return module


def paired(modules, run, rounds):
    """`run(name, round)` for each module's name in turn, alternating the order: fastest times, paired ratio."""
    times = {name: [] for name in modules}
    for r in range(rounds + 1):  # round 0 warms the code paths
        for name in list(modules) if r % 2 else list(modules)[::-1]:
            t0 = time.perf_counter()
            run(name, r)
            if r:
                times[name].append(time.perf_counter() - t0)
    this, other = (np.array(times[name]) for name in modules)
    return {name: min(t) for name, t in times.items()}, float(np.median(this / other))


def against(revision, shapes, rounds, rng):
    import keras_vg.detect as this

    modules = {"this": this, revision: detect_at(revision)}
    print(f"{'':>24}  {'this':>9}  {revision:>9}  paired ratio")
    for shape in shapes:
        T, n = (int(x) for x in shape.split("x"))
        steps, values, names = make_records(rng, 40 + T * (rounds + 1), n)
        detectors = {name: module.StreamingDetector() for name, module in modules.items()}
        for name in modules:
            detectors[name].observe_many(steps[:40], {s: v[:40] for s, v in values.items()}, names)

        def feed(name, r, T=T, steps=steps, values=values, names=names, detectors=detectors):
            rows = slice(40 + r * T, 40 + (r + 1) * T)
            detectors[name].observe_many(steps[rows], {s: v[rows] for s, v in values.items()}, names)

        best, ratio = paired(modules, feed, rounds)
        print(f"{'observe_many ' + shape:>24}  {best['this'] * 1e3:6.2f} ms  {best[revision] * 1e3:6.2f} ms"
              f"  {ratio:.2f}")
    norms = rng.random((20000, 1000), dtype=np.float32) + 0.5
    stats = {"grad_norm": (np.arange(20000), [f"dense_{i}/kernel" for i in range(1000)], norms)}
    best, ratio = paired(modules, lambda name, r: modules[name].classify(stats), max(2, rounds // 2))
    print(f"{'classify 20000 x 1000':>24}  {best['this'] * 1e3:6.0f} ms  {best[revision] * 1e3:6.0f} ms  {ratio:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--shapes", default="1x50,50x50,50x1000,200x1000",
                        help="comma-separated TxN batch shapes")
    parser.add_argument("--against", metavar="REV", help="time this checkout's detect against git revision REV")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.against:
        against(args.against, args.shapes.split(","), args.rounds, rng)
        return
    print(f"{'batch T x N':>12}  {'observe x T':>12}  {'observe_many':>12}  {'speed-up':>8}")
    for shape in args.shapes.split(","):
        T, n = (int(x) for x in shape.split("x"))
        best = bench_streaming(T, n, args.rounds, rng)
        print(f"{shape:>12}  {best['observe'] * 1e3:9.2f} ms  {best['observe_many'] * 1e3:9.2f} ms"
              f"  {best['observe'] / best['observe_many']:7.1f}x")
    print(f"classify, 1000 variables x 20000 steps: {bench_classify(args.rounds, rng) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
