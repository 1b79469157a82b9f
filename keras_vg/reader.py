"""Reads keras-vg event files back into numpy arrays.

It needs no TensorFlow, but TensorBoard's event loader, which it uses, imports
TensorFlow when it is installed (the `keras-vg` CLI avoids that).

Example:

>>> run = read_run("logs/run1")                       # doctest: +SKIP
>>> steps, names, values = run.stat("grad_norm")      # doctest: +SKIP
"""

import glob
import os
import sys
import types

import numpy as np

from keras_vg import format as fmt


def tensorboard_without_tensorflow():
    """Has TensorBoard read and write event files with its pure-Python fallback in this process.

    TensorBoard imports TensorFlow, when it is installed, only to iterate and
    build records (seconds of start-up, and beside JAX a second framework in
    the process); its fallback reads and writes the same files. The marker
    module `tensorboard.compat.notf` asks for it (TensorBoard 2.21). Nothing
    changes once TensorFlow is imported.
    """
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def _event_files(directory):
    return sorted(glob.glob(os.path.join(directory, "*tfevents*")))


def _load_file(path):
    """Yields (step, wall_time, name, metadata_content_or_None, TensorProto) for our tags."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    for record in RawEventFileLoader(path).Load():
        event = event_pb2.Event.FromString(record)
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            name = fmt.name_for(value.tag)
            if name is None:
                continue
            content = None
            if value.HasField("metadata") and value.metadata.plugin_data.plugin_name == fmt.PLUGIN_NAME:
                content = value.metadata.plugin_data.content
            yield event.step, event.wall_time, name, content, value.tensor


class Run:
    """The keras-vg records of one run directory, as numpy arrays.

    Build it with `read_run`. Steps are the optimizer's `iterations` before
    the update. Where a step was recorded twice (a resumed run that repeated
    steps), the record written last wins.
    """

    def __init__(self, log_dir, series, metadata, json_records):
        self.log_dir = log_dir
        self._series = series  # name -> {step: 1-D array}
        self._metadata = metadata  # name -> decoded metadata (latest)
        self._json = json_records  # name -> list of (step, value)

    def stats(self):
        """Returns the names of the statistics present, in `format.STATS` order."""
        return [name for name in fmt.STATS if name in self._series]

    def stat(self, name, by="variable"):
        """Returns one statistic over time.

        Args:
            name: A statistic name from `keras_vg.format.STATS`.
            by: `"variable"` for the values as recorded, or `"layer"` to
                combine a per-variable statistic into one value per layer
                (`keras_vg.layer_stats`: norms as the root of the sum of
                squares, maxima as the max, non-finite counts as the sum,
                update ratios over the layer's variables together).
                Per-layer and scalar statistics are the same either way.
                Defaults to `"variable"`.

        Returns:
            `(steps, names, values)`: `steps` an int64 array `[T]`; `names`
            the list of `N` variable paths or layer names (empty for a
            scalar statistic); `values` a float32 array `[T, N]`, or `[T]`
            for a scalar statistic. `names` is the union of the names
            recorded over the run, in model order: where the trainable
            variables changed between two `fit` calls (layers unfrozen or
            frozen), a name not recorded at a step reads NaN there. With
            `by="layer"`, `names` are layer names.

        Raises:
            KeyError: if the run has no such statistic; the message lists
                those it has.
            ValueError: for a `by` other than `"variable"` and `"layer"`.

        Example:

        >>> steps, layers, norms = read_run("logs/run1").stat("grad_norm", by="layer")  # doctest: +SKIP
        """
        if by not in ("variable", "layer"):
            raise ValueError(f'`by` must be "variable" or "layer". Received: by={by!r}')
        if name not in self._series:
            raise KeyError(
                f"This run has no statistic {name!r}. Available: {self.stats()}. "
                f"Known statistics: {list(fmt.STATS)}"
            )
        if by == "layer" and fmt.axis_of(name) == fmt.AXIS_VARIABLE:
            return self._by_layer(name)
        by_step = self._series[name]
        steps = np.array(sorted(by_step), dtype=np.int64)
        if fmt.axis_of(name) == fmt.AXIS_SCALAR:
            values = np.array([by_step[s][1].reshape(()) for s in steps], dtype=np.float32)
            return steps, [], values
        lists = {id(n): n for n, _ in (by_step[s] for s in steps)}  # one list per file, in step order
        names = fmt.merge_names(list(lists.values()))
        index = {n: i for i, n in enumerate(names)}
        values = np.full((len(steps), len(names)), np.nan, dtype=np.float32)
        for row, step in enumerate(steps):
            step_names, step_values = by_step[step]
            if step_names is names or list(step_names) == names:
                values[row] = step_values
            else:
                for n, v in zip(step_names, step_values):
                    if n in index:
                        values[row, index[n]] = v
        return steps, names, values

    def _by_layer(self, name):
        from keras_vg import layer_stats

        steps, names, values = self.stat(name)
        summaries = [summary for _, summary in self._json.get(fmt.MODEL_NAME, [])]
        every_layer = [layer for summary in summaries for layer in summary.get("layers", [])]
        layers = layer_stats.variable_layers(names, {"layers": every_layer})
        weight_norm = None
        if name == "update_ratio":
            if "weight_norm" not in self._series:
                raise KeyError("This run has no `weight_norm`, through which `update_ratio` combines by layer. "
                               f"Available: {self.stats()}")
            norm_steps, norm_names, norms = self.stat("weight_norm")
            weight_norm = np.full(values.shape, np.nan, np.float32)
            rows = {step: row for row, step in enumerate(norm_steps)}
            columns = {n: i for i, n in enumerate(norm_names)}
            for row, step in enumerate(steps):
                if step in rows:
                    weight_norm[row] = [norms[rows[step], columns[n]] if n in columns else np.nan for n in names]
        layer_names, layer_values = layer_stats.by_layer(name, layers, values, weight_norm)
        return steps, layer_names, layer_values

    def events(self):
        """Returns the recorded events (alerts, clipping on/off, skipped steps).

        Returns:
            A list of dicts sorted by step, each with at least `step`, `kind`
            (one of `format.EVENT_KINDS`) and `message`.
        """
        events = []
        for step, batch in self._json.get(fmt.EVENTS_NAME, []):
            for event in batch:
                events.append(dict(event, step=int(event.get("step", step))))
        return sorted(events, key=lambda e: e["step"])

    def model(self):
        """Returns the last model summary written to this run, or None."""
        records = self._json.get(fmt.MODEL_NAME, [])
        return records[-1][1] if records else None

    def diagnose(self, thresholds=None):
        """Returns the findings in plain words, with remedies; see `keras_vg.diagnosis.diagnose`."""
        from keras_vg.diagnosis import diagnose

        return diagnose(self, thresholds)

    def plot(self, stat="grad_norm", path=None, ax=None, thresholds=None):
        """Draws the layers x steps heatmap (matplotlib); see `keras_vg.plot.plot_run`."""
        from keras_vg.plot import plot_run

        return plot_run(self, stat=stat, path=path, ax=ax, thresholds=thresholds)


def read_run(log_dir):
    """Reads all keras-vg records of one run directory.

    Args:
        log_dir: The directory given to `GradientMonitor(log_dir=...)`.

    Returns:
        A `Run`.

    Raises:
        FileNotFoundError: if `log_dir` does not exist.
        keras_vg.format.FormatError: if it holds no keras-vg data (the
            message names runs found in its subdirectories), or data of a
            newer format version than this keras-vg reads.

    Example:

    >>> run = read_run("logs/run1")                   # doctest: +SKIP
    >>> steps, names, values = run.stat("grad_norm")  # doctest: +SKIP
    """
    log_dir = os.fspath(log_dir)
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"No such run directory: {log_dir!r}")
    series, metadata, json_records = {}, {}, {}
    for path in _event_files(log_dir):
        file_metadata = {}
        for step, _, name, content, tensor in _load_file(path):
            if content is not None:
                file_metadata[name] = fmt.decode_metadata(content)
                metadata[name] = file_metadata[name]
            if name not in file_metadata:
                continue  # no metadata for this tag in this file: not ours to interpret
            _add_record(name, step, tensor, file_metadata[name], series, json_records)
    if not series and not json_records:
        runs = find_runs(log_dir)
        hint = f" Runs found below it: {', '.join(runs)}." if runs else ""
        raise fmt.FormatError(f"No keras-vg data in {log_dir!r}.{hint}")
    return Run(log_dir, series, metadata, json_records)


def _add_record(name, step, tensor, metadata, series, json_records):
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(tensor)
    axis = metadata.get("axis")
    if axis == fmt.AXIS_JSON:
        json_records.setdefault(name, []).append((int(step), fmt.decode_json(array.item())))
    else:
        names = metadata.get("names", [])
        series.setdefault(name, {})[int(step)] = (names, np.asarray(array, dtype=np.float32))


def latest_records(log_dir):
    """The last step and the last model summary that keras-vg wrote into a run directory.

    Writers call this when training starts, to continue the run's step axis
    instead of writing over it. Only the newest event files are read: each
    `fit` writes a file of its own, and steps only go forward.

    Args:
        log_dir: A run directory (it need not exist).

    Returns:
        A tuple `(last_step, model_summary)`: the largest step recorded (None
        if nothing was) and the newest model summary (None if none).
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    last_step, summary = None, None
    model_tag = fmt.tag_for(fmt.MODEL_NAME)
    ours = [path for path in _event_files(os.fspath(log_dir)) if path.endswith(".keras_vg")]
    # Newest first by modification time: names hold the creating second only.
    for path in sorted(ours, key=os.path.getmtime, reverse=True):
        for record in RawEventFileLoader(path).Load():
            event = event_pb2.Event.FromString(record)
            tags = [value.tag for value in event.summary.value if fmt.name_for(value.tag) is not None]
            if not tags:
                continue
            last_step = event.step if last_step is None else max(last_step, event.step)
            for value in event.summary.value:
                if value.tag == model_tag:
                    summary = fmt.decode_json(value.tensor.string_val[0])
        if last_step is not None:
            break
    return last_step, summary


def find_runs(root):
    """Lists the directories below `root` (itself included) holding keras-vg event files.

    Returns:
        Paths relative to `root`, sorted; `"."` stands for `root` itself.
    """
    runs = []
    for directory, _, files in os.walk(root):
        if any(".keras_vg" in f and "tfevents" in f for f in files):
            runs.append(os.path.relpath(directory, root))
    return sorted(runs)
