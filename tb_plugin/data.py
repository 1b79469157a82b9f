"""Reads keras-vg series through TensorBoard's `data_provider`, with a small cache.

Only `context.data_provider` is used, so the plugin works the same over the
Python loader and the Rust data server (where `context.multiplexer` is None).

Turning 20,000 tensor protos into one matrix costs ~0.5 s, more than a
heatmap request may take, so the matrix of each (run, statistic) is cached
until TensorBoard reports new data for it (its `max_step` or `max_wall_time`
changes).
"""

import collections
import threading

import numpy as np
from tensorboard.data import provider as provider_lib

from keras_vg import format as fmt

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
    """

    def __init__(self, name, steps, names, values, retention):
        self.name = name
        self.steps = steps
        self.names = names
        self.values = values
        self.retention = retention
        self.version = None  # set by Reader.series: changes when TensorBoard has new data

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
        self._cache = collections.OrderedDict()
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()

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

    def series(self, ctx, eid, run, name):
        """Returns the `Series` of one statistic of one run (cached).

        Raises:
            BadRequest: unknown run or statistic, or a format this version
                cannot read (the message says to upgrade).
        """
        if name not in fmt.STAT_AXES:
            raise BadRequest(f"Unknown statistic. Expected one of {list(fmt.STATS)}. Received: stat={name!r}")
        time_series = self._time_series(ctx, eid, run, name)
        key = (eid, run, name, time_series.max_step, time_series.max_wall_time)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        metadata = _decode(time_series.plugin_content)
        series = _stack(self._read(ctx, eid, run, name), metadata.get("names", []), name)
        series.retention = self.retention(len(series.steps))
        series.version = key
        with self._lock:
            self._cache[key] = series
            while len(self._cache) > 1 and sum(
                s.values.nbytes for s in self._cache.values()
            ) > self._cache_bytes:
                self._cache.popitem(last=False)
        return series

    def json_records(self, ctx, eid, run, name):
        """Returns `[(step, decoded JSON)]` of the `events` or `model` tag, and its retention."""
        tag = fmt.tag_for(name)
        listing = self._provider.list_tensors(
            ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME,
            run_tag_filter=provider_lib.RunTagFilter(runs=[run], tags=[tag]),
        )
        if tag not in listing.get(run, {}):
            if not self.runs(ctx, eid).get(run):
                raise BadRequest(f"Unknown run. Received: run={run!r}")
            return [], self.retention(0)
        _decode(listing[run][tag].plugin_content)
        records = []
        for datum in self._read(ctx, eid, run, name):
            try:
                records.append((int(datum.step), fmt.decode_json(np.asarray(datum.numpy).item())))
            except (ValueError, UnicodeDecodeError):
                continue  # a torn or foreign record: show the rest rather than nothing
        return records, self.retention(len(records))

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


def _stack(data, names, name):
    """Stacks `TensorDatum`s into a `Series`; the record read last wins a repeated step."""
    by_step = {}
    for datum in data:
        by_step[int(datum.step)] = datum.numpy
    steps = np.array(sorted(by_step), dtype=np.int64)
    width = 1 if fmt.axis_of(name) == fmt.AXIS_SCALAR else len(names)
    # Filled step-major (contiguous rows), then transposed once: writing
    # 20,000 strided columns is several times slower.
    rows = np.full((len(steps), width), np.nan, dtype=np.float32)
    for index, step in enumerate(steps):
        row = np.asarray(by_step[step], dtype=np.float32).ravel()
        # TensorBoard keeps the metadata of a tag's first event only: if the
        # model grew between two fits, entries beyond the names are dropped,
        # and names without an entry stay NaN.
        count = min(row.size, width)
        rows[index, :count] = row[:count]
    values = np.ascontiguousarray(rows.T)
    return Series(name, steps, list(names), values, retention=None)
