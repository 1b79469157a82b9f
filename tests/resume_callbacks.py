"""Callbacks that the resume tests put beside `BackupAndRestore`: an interruption, and a witness of the restore."""

import keras


class StopAtEpoch(keras.callbacks.Callback):
    """Raises `RuntimeError("interrupted")` as epoch `epoch` begins, as a killed job would stop."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


class IterationsAtFirstBatch(keras.callbacks.Callback):
    """Keeps the optimizer's `iterations` at the first batch: a real resume starts past 0."""

    def on_train_begin(self, logs=None):
        self.value = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.value is None:
            self.value = int(self.model.optimizer.iterations.numpy())
