"""Interleaved timing of `fit` arms in one process, shared by the overhead benchmarks.

Every arm trains its own copy of the model. Round 0 is a warm-up (tracing);
each later round runs every arm once, starting at the next arm each round,
since on shared machines an arm's place in the round alone moved its time by
up to 15%. Within a round, each arm's time is divided by plain `fit`'s time
in the same round: these paired ratios cancel the slow drifts of a shared
machine, and their median and quartiles are reported beside the ratio of
the fastest rounds. The same is reported for the process CPU time of each
round's whole `fit` call: with TensorFlow held to one thread (`--threads 1`)
it measures the work an arm adds rather than what the machine's other
tenants did meanwhile, and was the steadiest measure on the development VM.
"""

import statistics
import time

import keras


def add_threads_option(parser):
    """Adds `--threads` to a benchmark's `argparse` parser; `hold_threads` applies it."""
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (0: TensorFlow's default). One thread "
                             "makes CPU time a measure of work on a machine shared with others.")


def hold_threads(count):
    """Holds TensorFlow to `count` intra- and inter-op threads; 0 leaves its default (TensorFlow backend only)."""
    if count and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(count)
        tf.config.threading.set_inter_op_parallelism_threads(count)


class BatchTimer(keras.callbacks.Callback):
    """Wall time from the start of batch 2 to the start of the last batch (TensorFlow).

    Only batch-begin hooks: a batch-end hook would make Keras wait for the
    device after every step (to give it the logs as numbers), which plain
    `fit` does not do. On JAX a step returns before it has run, so batch
    starts measure dispatch: there the time runs to the end of `fit`, after
    waiting for the weights (`steps_after_warm_up` counts the steps either way).
    """

    def on_train_begin(self, logs=None):
        self.total, self._first = 0.0, None

    def on_train_batch_begin(self, batch, logs=None):
        now = time.perf_counter()
        if batch == 2:
            self._first = now
        elif self._first is not None and keras.backend.backend() != "jax":
            self.total = now - self._first

    def on_train_end(self, logs=None):
        if keras.backend.backend() == "jax" and self._first is not None:
            import jax

            jax.block_until_ready([variable.value for variable in self.model.trainable_variables])
            self.total = time.perf_counter() - self._first


def steps_after_warm_up(batches):
    """The steps `BatchTimer` times in a fit of `batches` batches."""
    return batches - 2 if keras.backend.backend() == "jax" else batches - 3


def time_arms(models, callbacks, fit, rounds, on_warmed_up=None):
    """Times `fit(model, callbacks)` of every arm, interleaved.

    Args:
        models: A dict from arm name to its model; must include `"plain"`.
        callbacks: A dict from arm name to its list of callbacks, kept
            across rounds (a later fit reuses the traced function).
        fit: A function `(model, callbacks)` that runs one round of `fit`.
        rounds: Timed rounds, after the warm-up round.
        on_warmed_up: An optional function of no arguments, called after
            the warm-up round.

    Returns:
        A tuple of dicts from arm name to per-round lists: `(wall, cpu)`,
        the batch wall time and the process CPU time of each round.
    """
    names = list(models)
    wall = {arm: [] for arm in names}
    cpu = {arm: [] for arm in names}
    for round_index in range(rounds + 1):
        offset = round_index % len(names)
        for arm in names[offset:] + names[:offset]:
            timer = BatchTimer()
            start = time.process_time()
            fit(models[arm], callbacks[arm] + [timer])
            if round_index > 0:
                wall[arm].append(timer.total)
                cpu[arm].append(time.process_time() - start)
        if round_index == 0 and on_warmed_up is not None:
            on_warmed_up()
    return wall, cpu


def print_table(title, wall, cpu, steps_per_round):
    """Prints the arms' ratios to plain `fit` as a Markdown table."""
    base = wall["plain"]
    print(f"\n{title} (plain: fastest {min(base) / steps_per_round * 1e3:.1f} ms/step)")
    print("| arm | fastest round ratio | median paired ratio [quartiles] | median paired CPU-time ratio "
          "[quartiles] |")
    print("|---|---|---|---|")
    for arm, values in wall.items():
        if arm == "plain":
            continue
        fastest = min(values) / min(base)
        print(f"| {arm} | {fastest:.3f} | {_paired(values, base)} | {_paired(cpu[arm], cpu['plain'])} |")


def _paired(values, base):
    """`median [q1, q3]` of the per-round ratios `values[i] / base[i]`."""
    ratios = [v / b for v, b in zip(values, base)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return f"{statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]"
