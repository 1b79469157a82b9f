"""Shared expectations: every way of writing a model, through every workflow people use.

Each case trains a model written one way (with or without `keras.Input`,
functional, subclassed and never called, a `keras.applications` model)
through one workflow (numpy arrays beside Keras's own callbacks, `tf.data`
of unknown length, `PyDataset` with AutoClip, fits that continue, a
recompile after unfreezing, a resume by `BackupAndRestore`, XLA with several
steps per execution, MirroredStrategy), and checks the same two things
against Keras itself: the variables recorded are `model.trainable_variables`,
and the steps recorded are the optimizer's steps that are multiples of
`every`, on one axis that only goes forward.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from resume_callbacks import IterationsAtFirstBatch, StopAtEpoch

import keras_vg

pytestmark = pytest.mark.fit

EVERY = 2
BATCH = 16
rng = np.random.RandomState(0)
X = rng.randn(64, 8).astype("float32")
Y = rng.randint(0, 3, size=(64,)).astype("int32")
IMAGES = rng.rand(32, 32, 32, 3).astype("float32")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def sequential_with_input():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])


def sequential_without_input():
    return keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])


def functional():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Add()([hidden, keras.layers.Dense(16)(hidden)])))


def subclassed_unbuilt():
    return Subclassed()


def subclassed_built():
    model = Subclassed()
    model(X[:1])
    return model


def applications():
    return keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=3,
                                               minimalistic=True, include_preprocessing=False)


MODELS = [sequential_with_input, sequential_without_input, functional, subclassed_unbuilt, subclassed_built,
          applications]


def data_for(builder):
    return (IMAGES, Y[:32]) if builder is applications else (X, Y)


def compile_model(model, optimizer=None, **kwargs):
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs)
    return model


def iterations(model):
    return int(model.optimizer.iterations.numpy())


def monitor(log_dir):
    return keras_vg.GradientMonitor(log_dir, every=EVERY, verbose=0)


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, index):
        return self.x[index * BATCH:(index + 1) * BATCH], self.y[index * BATCH:(index + 1) * BATCH]


# Workflows: each trains `builder`'s model and returns `(phases, log_dir)`, a phase being
# `(model, first optimizer step, last optimizer step)` of one compiled optimizer, in order.


def arrays_beside_keras_callbacks(builder, tmp_path):
    x, y = data_for(builder)
    model = compile_model(builder(), optimizer=keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.9)))
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    model.fit(x, y, sample_weight=weights, validation_data=(x[:BATCH], y[:BATCH]), batch_size=BATCH, epochs=2,
              verbose=0, callbacks=[
                  keras.callbacks.TensorBoard(tmp_path / "run", update_freq=1),
                  keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), save_weights_only=True),
                  keras.callbacks.EarlyStopping(patience=5),
                  keras.callbacks.ReduceLROnPlateau(patience=1) if builder is not applications else
                  keras.callbacks.TerminateOnNaN(),
                  monitor(tmp_path / "run"),
              ])
    return [(model, 0, iterations(model))], tmp_path / "run"


def dataset_of_unknown_length_fit_twice(builder, tmp_path):
    x, y = data_for(builder)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(BATCH)
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model = compile_model(builder())
    same = monitor(tmp_path)
    model.fit(dataset, epochs=2, verbose=0, callbacks=[same], class_weight={0: 1.0, 1: 2.0, 2: 0.5})
    model.fit(dataset, epochs=3, initial_epoch=2, verbose=0, callbacks=[same])
    return [(model, 0, iterations(model))], tmp_path


def pydataset_with_autoclip(builder, tmp_path):
    x, y = data_for(builder)
    model = compile_model(builder())
    model.fit(Batches(x, y), epochs=2, verbose=0, callbacks=[monitor(tmp_path), keras_vg.AutoClip(verbose=0)])
    run = keras_vg.read_run(tmp_path)
    assert len(run.stat("clip_threshold")[0]) == iterations(model)  # AutoClip records every step
    return [(model, 0, iterations(model))], tmp_path


def recompile_after_unfreezing(builder, tmp_path):
    # The fine-tuning guide's way: freeze, fit, unfreeze, compile a new optimizer, fit again.
    x, y = data_for(builder)
    model = builder()
    first_layer = next(layer for layer in model.layers if layer.weights or not model.built)
    first_layer.trainable = False
    compile_model(model)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor(tmp_path)])
    phases = [(model, 0, iterations(model))]
    frozen = [v.path for v in model.trainable_variables]
    first_layer.trainable = True
    compile_model(model, optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor(tmp_path)])
    phases.append((model, 0, iterations(model)))
    assert len(frozen) < len(model.trainable_variables)
    return phases, tmp_path


def resumed_by_backup_and_restore(builder, tmp_path):
    x, y = data_for(builder)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))

    def built(model):
        model(x[:1])  # BackupAndRestore itself needs a built model
        return compile_model(model)

    with pytest.raises(RuntimeError, match="interrupted"):
        built(builder()).fit(x, y, batch_size=BATCH, epochs=3, verbose=0,
                             callbacks=[backup, monitor(tmp_path / "run"), StopAtEpoch(2)])
    keras.backend.clear_session()  # names as a new process would give them
    resumed = built(builder())
    first = IterationsAtFirstBatch()
    resumed.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[backup, first, monitor(tmp_path / "run")])
    steps_per_epoch = len(x) // BATCH
    assert first.value == 2 * steps_per_epoch  # the restore happened: it did not start again from 0
    return [(resumed, 0, iterations(resumed))], tmp_path / "run"


def xla_with_steps_per_execution(builder, tmp_path):
    x, y = data_for(builder)
    model = compile_model(builder(), jit_compile=True, steps_per_execution=3)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor(tmp_path)])
    return [(model, 0, iterations(model))], tmp_path


def mirrored(builder, tmp_path, strategy):
    x, y = data_for(builder)
    with strategy.scope():
        model = compile_model(builder())
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor(tmp_path)])
    return [(model, 0, iterations(model))], tmp_path


WORKFLOWS = [arrays_beside_keras_callbacks, dataset_of_unknown_length_fit_twice, pydataset_with_autoclip,
             recompile_after_unfreezing, resumed_by_backup_and_restore, xla_with_steps_per_execution, mirrored]

# A keras.applications model costs a minute of tracing per case on the CI machine. It goes
# through the workflows where its size and structure matter (many layers beside Keras's
# callbacks, the transfer-learning recompile it is made for, a strategy); the others exercise
# host-side logic that the small functional model already takes through them.
CASES = [(b, w) for b in MODELS for w in WORKFLOWS if b is not applications
         or w in (arrays_beside_keras_callbacks, recompile_after_unfreezing, mirrored)]


@pytest.mark.parametrize("builder,workflow", CASES, ids=lambda f: f.__name__)
def test_records_every_trainable_variable_at_every_recorded_step(builder, workflow, tmp_path, request):
    keras.utils.set_random_seed(0)
    if workflow is mirrored:
        phases, log_dir = mirrored(builder, tmp_path, request.getfixturevalue("two_cpu_strategy"))
    else:
        phases, log_dir = workflow(builder, tmp_path)
    run = keras_vg.read_run(log_dir)
    steps, names, grad_norm = run.stat("grad_norm")

    expected_steps, offset, expected_names = [], 0, []
    for model, first, last in phases:
        phase_steps = [offset + s for s in range(first, last) if s % EVERY == 0]
        expected_steps += phase_steps
        offset = phase_steps[-1] + 1
        expected_names += [n for n in (v.path for v in model.trainable_variables) if n not in expected_names]
    # A resume repeats no step: the resumed optimizer continues the count the run left off at.
    np.testing.assert_array_equal(steps, expected_steps if workflow is not resumed_by_backup_and_restore
                                  else [s for s in range(0, phases[0][2]) if s % EVERY == 0])
    assert sorted(names) == sorted(expected_names)
    last_model = phases[-1][0]
    last_rows = grad_norm[-1, [names.index(v.path) for v in last_model.trainable_variables]]
    assert np.all(np.isfinite(last_rows)), "every trainable variable is recorded at the last record"
    assert run.model() is not None and len(run.model()["layers"]) > 0
