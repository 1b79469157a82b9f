"""Reads keras-vg series through TensorBoard's `data_provider`, with a small cache.

Only `context.data_provider` is used, so the plugin works the same over the
Python loader and the Rust data server (where `context.multiplexer` is None).

The data provider hands out whole series only: each read converts all of a
series' tensor protos again (~0.6 s for 20,000 records of 1,000 values). So
the matrix of each (run, statistic) is cached until TensorBoard reports new
data for it (its `max_step` or `max_wall_time` changes), and then only the
records that were appended are stacked onto it; anything else (TensorBoard's
retention replaced records, a restarted run rewrote steps) is stacked anew.
"""

import collections
import threading

import numpy as np
from tensorboard.data import provider as provider_lib

from keras_vg import format as fmt
from tb_plugin import background, layers

READ_ALL = 10**9
"""`downsample` for `read_tensors`: larger than any series, so nothing is dropped here."""

PYTHON_LOADER_DEFAULT = 10
"""Tensors kept per series by TensorBoard's Python loader without --samples_per_plugin."""
RUST_LOADER_DEFAULT = 100
"""Tensors kept per series by the Rust data server without --samples_per_plugin."""
SAMPLES_HINT = f"--samples_per_plugin={fmt.PLUGIN_NAME}=0"


class BadRequest(ValueError):
    """A request named something that does not exist, or sent a malformed value."""


class Series:
    """One statistic of one run, stacked: `steps [T]`, `names [N]`, `values [N, T]`.

    `values` is variable-major (one row per variable or layer, in model order)
    because the heatmap reduces along steps, which is fastest on contiguous rows.
    A scalar statistic has `names == []` and `values` of shape `[1, T]`.

    A `Series` never changes once built. When TensorBoard appends records,
    the next `Series` of the same statistic may share its storage: it writes
    only columns beyond this one's `T`.
    """

    def __init__(self, name, steps, names, values, retention):
        self.name = name
        self.steps = steps
        self.names = names
        self.values = values
        self.retention = retention
        self.version = None  # set by Reader.series: changes when TensorBoard has new data
        # For layer rows of a per-variable statistic (`tb_plugin.layers`): the
        # variables' paths and the layer of each, in the variables' order.
        self.variable_names = None
        self.variable_layers = None
        # Set by `_stack`/`_append`: the storage `values` is a view of
        # (`[N, capacity]`), and the step and wall time of every record read,
        # in the provider's order, to recognise an append next time.
        self.storage = values
        self.read_steps = steps
        self.read_wall_times = np.zeros(len(steps))

    def row(self, name):
        """Returns the row index of a variable or layer name, or raises BadRequest."""
        if not self.names:
            return 0
        try:
            return self.names.index(name)
        except ValueError:
            raise BadRequest(f"Unknown variable or layer. Received: name={name!r}") from None


class Reader:
    """Lists runs and reads series through a TensorBoard data provider.

    Args:
        data_provider: `context.data_provider`.
        sampling_hints: `context.sampling_hints` (the parsed
            `--samples_per_plugin`), or None.
        cache_bytes: Memory for cached series; the least recently used go
            first, but the latest one always stays. Defaults to 512 MB
            (six 1,000-variable x 20,000-step series).

    Example:

    >>> reader = Reader(context.data_provider, context.sampling_hints)  # doctest: +SKIP
    >>> series = reader.series(ctx, "", "run1", "grad_norm")            # doctest: +SKIP
    """

    def __init__(self, data_provider, sampling_hints=None, cache_bytes=512 * 2**20):
        self._provider = data_provider
        self._hints = dict(sampling_hints or {})
        self._cache = collections.OrderedDict()  # (eid, run, name[, "layer"]) -> its latest Series
        self._cache_bytes = cache_bytes
        self._json = {}  # (eid, run, name) -> (version, records): events and model summaries, small
        self._lock = threading.Lock()
        self._building = background.KeyedLocks()

    # Listing.

    def runs(self, ctx, eid):
        """Returns `{run: {name: TensorTimeSeries}}` for every keras-vg tag."""
        listing = self._provider.list_tensors(ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME)
        runs = {}
        for run, tags in listing.items():
            names = {fmt.name_for(tag): ts for tag, ts in tags.items() if fmt.name_for(tag)}
            if names:
                runs[run] = names
        return runs

    def _time_series(self, ctx, eid, run, name):
        tag = fmt.tag_for(name)
        listing = self._provider.list_tensors(
            ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME,
            run_tag_filter=provider_lib.RunTagFilter(runs=[run], tags=[tag]),
        )
        time_series = listing.get(run, {}).get(tag)
        if time_series is None:
            if not self.runs(ctx, eid).get(run):
                raise BadRequest(f"Unknown run. Received: run={run!r}")
            raise BadRequest(f"Run {run!r} has no statistic {name!r}.")
        return time_series

    def _read(self, ctx, eid, run, name):
        tag = fmt.tag_for(name)
        data = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME, downsample=READ_ALL,
            run_tag_filter=provider_lib.RunTagFilter(runs=[run], tags=[tag]),
        )
        return data.get(run, {}).get(tag, [])

    # Series.

    def series(self, ctx, eid, run, name, by="variable"):
        """Returns the `Series` of one statistic of one run (cached).

        Args:
            ctx: The request's `RequestContext`.
            eid: The experiment id.
            run: The run.
            name: A statistic of `keras_vg.format.STATS`.
            by: `"variable"` for the values as recorded, `"layer"` for a
                per-variable statistic combined per layer
                (`tb_plugin.layers`). Per-layer and scalar statistics are the
                same either way. Defaults to `"variable"`.

        Raises:
            BadRequest: unknown run or statistic, or a format this version
                cannot read (the message says to upgrade).
        """
        if name not in fmt.STAT_AXES:
            raise BadRequest(f"Unknown statistic. Expected one of {list(fmt.STATS)}. Received: stat={name!r}")
        if by == "layer" and fmt.axis_of(name) == fmt.AXIS_VARIABLE:
            return self._layer_series(ctx, eid, run, name)
        time_series = self._time_series(ctx, eid, run, name)

        def build(previous):
            names = _decode(time_series.plugin_content).get("names", [])
            # Listed before read: the data is at least as new as the version.
            series = _restack(previous, self._read(ctx, eid, run, name), names, name)
            series.retention = self.retention(len(series.steps))
            return series

        return self._memo((eid, run, name), (time_series.max_step, time_series.max_wall_time), build)

    def _layer_series(self, ctx, eid, run, name):
        variables = self.series(ctx, eid, run, name)
        weight_norm = None
        if name == "update_ratio":
            # A layer's ratio is ‖Δw‖/‖w‖ over its variables together: it needs their norms.
            try:
                weight_norm = self.series(ctx, eid, run, "weight_norm")
            except BadRequest:
                raise BadRequest(f"Run {run!r} has no `weight_norm`, through which `update_ratio` combines "
                                 "by layer; ask for by=variable.") from None
        summaries, summaries_version = self._json_records(ctx, eid, run, fmt.MODEL_NAME)
        version = (variables.version, weight_norm.version if weight_norm is not None else None, summaries_version)

        def build(previous):
            del previous  # recombined whole: cheap next to reading the variables' series
            names, values, owners = layers.combine(variables, weight_norm, [summary for _, summary in summaries])
            series = Series(name, variables.steps, names, values, variables.retention)
            series.variable_names, series.variable_layers = list(variables.names), owners
            return series

        return self._memo((eid, run, name, "layer"), version, build)

    def _memo(self, slot, version, build):
        """The cached `Series` of `slot` if it is of `version`, else `build(previous)`'s, cached.

        One build per slot at a time: a request that arrives while the
        background preparer builds the same series waits for it, and two
        builds never append to one storage.
        """
        cached = self._cached(slot, version)
        if cached is not None:
            return cached
        with self._building.hold(slot):
            cached = self._cached(slot, version)
            if cached is not None:
                return cached
            with self._lock:
                previous = self._cache.get(slot)
            series = build(previous)
            series.version = version
            self._store(slot, series)
        return series

    def _cached(self, slot, version):
        with self._lock:
            series = self._cache.get(slot)
            if series is None or series.version != version:
                return None
            self._cache.move_to_end(slot)
            return series

    def _store(self, slot, series):
        with self._lock:
            self._cache[slot] = series
            self._cache.move_to_end(slot)
            # The latest series always stays, even when alone above the budget.
            while len(self._cache) > 1 and sum(
                s.storage.nbytes for s in self._cache.values()
            ) > self._cache_bytes:
                self._cache.popitem(last=False)

    def json_records(self, ctx, eid, run, name):
        """Returns `[(step, decoded JSON)]` of the `events` or `model` tag, and its retention."""
        records, _ = self._json_records(ctx, eid, run, name)
        return records, self.retention(len(records))

    def _json_records(self, ctx, eid, run, name):
        """`([(step, decoded JSON)], version)`, read again only when TensorBoard has new records."""
        tag = fmt.tag_for(name)
        listing = self._provider.list_tensors(
            ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME,
            run_tag_filter=provider_lib.RunTagFilter(runs=[run], tags=[tag]),
        )
        if tag not in listing.get(run, {}):
            if not self.runs(ctx, eid).get(run):
                raise BadRequest(f"Unknown run. Received: run={run!r}")
            return [], None
        time_series = listing[run][tag]
        version = (time_series.max_step, time_series.max_wall_time)
        with self._lock:
            cached = self._json.get((eid, run, name))
        if cached is not None and cached[0] == version:
            return cached[1], version
        _decode(time_series.plugin_content)
        records = []
        for datum in self._read(ctx, eid, run, name):
            try:
                records.append((int(datum.step), fmt.decode_json(np.asarray(datum.numpy).item())))
            except (ValueError, UnicodeDecodeError):
                continue  # a torn or foreign record: show the rest rather than nothing
        with self._lock:
            self._json[(eid, run, name)] = (version, records)
        return records, version

    def retention(self, points):
        """Says whether TensorBoard's own retention may have dropped records.

        TensorBoard keeps a random sample of each series' records (always
        the last one) when there are more than its limit; then the series
        has exactly `limit` points.

        Returns:
            A dict with `points`, `limit` (0: keeps all), `may_be_cut`, `hint`.
        """
        limit = self._hints.get(fmt.PLUGIN_NAME)
        if limit is None:
            limit = PYTHON_LOADER_DEFAULT if _is_python_loader(self._provider) else RUST_LOADER_DEFAULT
        return {
            "hint": SAMPLES_HINT,
            "limit": int(limit),
            "may_be_cut": bool(limit) and points >= limit,
            "points": int(points),
        }


def _is_python_loader(data_provider):
    from tensorboard.backend.event_processing import data_provider as python_provider

    return isinstance(data_provider, python_provider.MultiplexerDataProvider)


def _decode(content):
    try:
        return fmt.decode_metadata(content)
    except fmt.FormatError as error:
        raise BadRequest(str(error)) from None


def _restack(previous, data, names, name):
    """Stacks `TensorDatum`s into a `Series`, appending to `previous` when they extend it.

    Args:
        previous: The last `Series` built for this statistic, or None.
        data: Every `TensorDatum` of the series, in the data provider's order.
        names: The variable or layer names from the tag's metadata.
        name: The statistic.

    Returns:
        A new `Series`, equal to what `_stack(data, names, name)` returns.
    """
    steps = np.fromiter((d.step for d in data), dtype=np.int64, count=len(data))
    wall_times = np.fromiter((d.wall_time for d in data), dtype=np.float64, count=len(data))
    if previous is not None and _extends(previous, steps, wall_times, names):
        return _append(previous, data, steps, wall_times)
    return _stack(data, names, name, steps, wall_times)


def _extends(previous, steps, wall_times, names):
    """Whether the records are `previous`'s records plus new, later steps, in order."""
    count = len(previous.read_steps)
    if list(names) != previous.names or len(steps) < count:
        return False
    # Compared with wall times too: a restarted run can rewrite the same steps.
    if not (np.array_equal(steps[:count], previous.read_steps)
            and np.array_equal(wall_times[:count], previous.read_wall_times)):
        return False
    tail = steps[count:]
    last = previous.steps[-1] if len(previous.steps) else np.iinfo(np.int64).min
    return bool(np.all(np.diff(tail) > 0)) and (not len(tail) or tail[0] > last)


def _append(previous, data, steps, wall_times):
    """`previous` plus the records after its own, written into its storage when there is room."""
    count, size = len(previous.read_steps), len(previous.steps)
    rows = _rows(data[count:], previous.values.shape[0])  # [k, N]
    storage = previous.storage
    if storage.shape[1] < size + len(rows):
        # Room for a quarter more, so a live run is not copied on every reload.
        capacity = size + len(rows) + max(len(rows), size // 4)
        storage = np.empty((storage.shape[0], capacity), dtype=np.float32)
        storage[:, :size] = previous.values
    # Columns beyond `size` belong to no built Series yet, so writing them is safe.
    storage[:, size:size + len(rows)] = rows.T
    new_steps = np.concatenate([previous.steps, steps[count:]])
    return _series(previous.name, new_steps, previous.names, storage, steps, wall_times)


def _stack(data, names, name, steps, wall_times):
    """Stacks `TensorDatum`s into a new `Series`; the record read last wins a repeated step."""
    if len(steps) and not np.all(np.diff(steps) > 0):
        last = {int(step): index for index, step in enumerate(steps)}  # the last one wins
        order = sorted(last)
        data = [data[last[step]] for step in order]
        stacked_steps = np.array(order, dtype=np.int64)
    else:
        stacked_steps = steps
    width = 1 if fmt.axis_of(name) == fmt.AXIS_SCALAR else len(names)
    # Stacked step-major (contiguous rows), then transposed once: writing
    # 20,000 strided columns is several times slower.
    storage = np.ascontiguousarray(_rows(data, width).T)
    return _series(name, stacked_steps, list(names), storage, steps, wall_times)


def _series(name, steps, names, storage, read_steps, read_wall_times):
    series = Series(name, steps, names, storage[:, :len(steps)], retention=None)
    series.storage = storage
    series.read_steps = read_steps
    series.read_wall_times = read_wall_times
    return series


def _rows(data, width):
    """The records' values as a float32 `[len(data), width]` array."""
    arrays = [np.asarray(datum.numpy, dtype=np.float32).reshape(-1) for datum in data]
    if not arrays:
        return np.zeros((0, width), dtype=np.float32)
    if all(array.size == width for array in arrays):
        return np.stack(arrays)
    # TensorBoard keeps the metadata of a tag's first event only: if the
    # model grew between two fits, entries beyond the names are dropped, and
    # names without an entry stay NaN.
    rows = np.full((len(arrays), width), np.nan, dtype=np.float32)
    for index, array in enumerate(arrays):
        count = min(array.size, width)
        rows[index, :count] = array[:count]
    return rows
