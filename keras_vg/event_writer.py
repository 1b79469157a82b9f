"""Writes keras-vg records into TensorBoard event files, on the host.

The writer uses TensorBoard's own `EventFileWriter` (the one PyTorch's
`SummaryWriter` uses too), so no TensorFlow op runs and nothing is added to the
compiled train step. The layout of what it writes is `keras_vg.format`.
"""

import atexit
import os
import time
import weakref

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

from keras_vg import format as fmt

_open_writers = weakref.WeakSet()


@atexit.register
def _flush_open_writers():
    # A fit that dies of an exception never reaches on_train_end: keep its records.
    for writer in list(_open_writers):
        writer.flush()


class EventWriter:
    """Appends keras-vg tensors to one event file in `log_dir`.

    The file is created on the first write ("avoid creating event files when
    not needed"). Each tag's first event carries its metadata, as TensorBoard
    reads metadata from a tag's first event only.

    Args:
        log_dir: Directory of the run. Created if missing.
        flush_secs: Longest time a written record may stay in memory before
            it is flushed to disk. Defaults to `10`.

    Example:

    >>> writer = EventWriter("/tmp/logs/run1")
    >>> writer.write_stat("grad_norm", step=0, values=[0.5], names=["dense/kernel"])
    >>> writer.close()
    """

    def __init__(self, log_dir, flush_secs=10):
        self.log_dir = os.fspath(log_dir)
        self.flush_secs = flush_secs
        self._writer = None
        self._tags_with_metadata = set()

    def _file_writer(self):
        if self._writer is None:
            # Imported here: the TensorBoard writer starts a thread on creation.
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = EventFileWriter(
                self.log_dir, max_queue_size=1000, flush_secs=self.flush_secs,
                filename_suffix=".keras_vg",
            )
            self._tags_with_metadata = set()
            _open_writers.add(self)
        return self._writer

    def _value(self, tag, tensor_proto, metadata):
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_proto)
        if tag not in self._tags_with_metadata:
            value.metadata.CopyFrom(metadata())
            self._tags_with_metadata.add(tag)
        return value

    def _add(self, step, values):
        writer = self._file_writer()  # first, so that a new file's metadata is written again
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values()))
        writer.add_event(event)

    def _plugin_metadata(self, content):
        return summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=fmt.PLUGIN_NAME, content=content
            ),
            data_class=summary_pb2.DATA_CLASS_TENSOR,
        )

    def _stat_value(self, name, values, names):
        array = np.asarray(values, dtype=np.float32)
        if fmt.axis_of(name) == fmt.AXIS_SCALAR:
            array = array.reshape(())
        return self._value(fmt.tag_for(name), _float_tensor(array),
                           lambda: self._plugin_metadata(fmt.encode_metadata(name, names)))

    def _scalar_value(self, tag, value):
        def metadata():
            return summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                data_class=summary_pb2.DATA_CLASS_SCALAR,
            )

        return self._value(tag, _float_tensor(np.asarray(value, dtype=np.float32).reshape(())), metadata)

    def write_stat(self, name, step, values, names=None):
        """Writes one statistic at one step.

        Args:
            name: A name from `keras_vg.format.STATS`.
            step: The optimizer step the values belong to.
            values: Per-variable or per-layer values (1-D), or one scalar.
            names: The variable paths or layer names, for per-variable and
                per-layer statistics.
        """
        self._add(step, lambda: [self._stat_value(name, values, names)])

    def write_record(self, step, stats, scalars=None):
        """Writes several statistics of one step as a single event (cheaper than one each).

        Args:
            step: The optimizer step the values belong to.
            stats: A dict from statistic name to `(values, names)`, as for
                `write_stat`.
            scalars: A dict from tag to value, for the stock Scalars tab.
        """
        def values():
            out = [self._stat_value(name, v, n) for name, (v, n) in stats.items()]
            return out + [self._scalar_value(tag, v) for tag, v in (scalars or {}).items()]

        self._add(step, values)

    def write_json(self, name, step, value):
        """Writes the events list or the model summary as a JSON string tensor."""
        from tensorboard.util import tensor_util

        tag = fmt.tag_for(name)
        proto = tensor_util.make_tensor_proto(np.array(fmt.encode_json(value), dtype=object))
        self._add(step, lambda: [self._value(tag, proto, lambda: self._plugin_metadata(fmt.encode_metadata(name)))])

    def write_scalar(self, tag, step, value):
        """Writes a plain scalar that TensorBoard's stock Scalars tab shows."""
        self._add(step, lambda: [self._scalar_value(tag, value)])

    def flush(self):
        """Writes everything queued so far to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        """Flushes and closes the file. A later write opens a new file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            _open_writers.discard(self)


def _float_tensor(array):
    """A float32 TensorProto, built directly: `make_tensor_proto` costs ~10x more per record."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=array.astype("<f4").tobytes())
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto
