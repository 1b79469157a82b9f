"""The Gradients tab: JSON routes over `context.data_provider`, and the static page.

Routes, served under `/data/plugin/keras_vg/` (all JSON with sorted keys; a
bad parameter gets a 400 with `{"error": ...}`):

| route             | parameters                       | answer                                          |
|-------------------|----------------------------------|-------------------------------------------------|
| `/runs`           |                                  | runs, their statistics and findings; the run to open |
| `/heatmap`        | `run, stat, columns, by`         | layers (or variables) x step buckets: log10 codes, classes |
| `/series`         | `run, stat, name, columns, by`   | one layer (or variable) over steps (bucket max and min) |
| `/profile`        | `run, stat, step[, step_end], by` | every layer (or variable) at one step (or bucket) |
| `/events`         | `run`                            | clipping on/off, skipped steps, alerts          |
| `/classification` | `run`                            | region episodes from `keras_vg.detect`          |
| `/static/*`       |                                  | the page (only files of `tb_plugin/static/`)    |

`by` is `layer` (the default: a per-variable statistic combined per layer,
`tb_plugin.layers`) or `variable`. Downsampling keeps extremes: see
`tb_plugin.downsample`. The cells' classes are `keras_vg.detect`'s, put on the
heatmap's rows and steps by `keras_vg.heatmap_marks`.

Stacking a big run and running the region rules takes seconds, so while the
page is in use a background thread (`tb_plugin.background.Preparer`) does it
as soon as TensorBoard has new data for the runs shown lately (or, before
any was shown, the runs with the newest data), and requests find it ready.
"""

import collections
import json
import os
import threading
import types

import numpy as np
from tensorboard import context as context_lib
from tensorboard.backend import http_util, json_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from keras_vg import format as fmt
from keras_vg import heatmap_marks
from tb_plugin import background, downsample
from tb_plugin import data as data_lib

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

MAX_COLUMNS = 4000
MAX_CELLS = 640_000
"""Largest heatmap sent (variables x columns): 1.7 MB of base64. More
variables get fewer columns, and the response says so."""

CLASSIFICATION_CACHE = 8
"""Runs whose region codes are kept in memory."""

PREPARED_RUNS = 2
"""Runs the background thread keeps ready: the page shows one, or two side by side."""

HEATMAP_STATS = tuple(s for s in fmt.STATS if fmt.axis_of(s) != fmt.AXIS_SCALAR)

FINDING_EVENTS = ("alert", "nonfinite", "warning")
"""Recorded event kinds that are findings (the others switch clipping or skip a step)."""


class GradientsPlugin(base_plugin.TBPlugin):
    """Serves the Gradients tab.

    Args:
        context: A `base_plugin.TBContext`; only `data_provider` and
            `sampling_hints` are used.
        prepare_in_background: Whether a background thread prepares the
            runs shown lately as soon as TensorBoard has new data for them
            (see `prepare_runs`). It runs only while requests come.
        poll_seconds: How often that thread asks the data provider for new data.

    Example:

    >>> plugin = GradientsPlugin(base_plugin.TBContext(data_provider=provider))  # doctest: +SKIP
    """

    plugin_name = fmt.PLUGIN_NAME

    def __init__(self, context, prepare_in_background=True, poll_seconds=2.0):
        self._reader = data_lib.Reader(context.data_provider, context.sampling_hints)
        self._static_files = _list_static_files()
        self._classifications = collections.OrderedDict()  # (eid, run) -> (data versions, result)
        self._lock = threading.Lock()
        self._classifying = background.KeyedLocks()
        self._preparer = (background.Preparer(self.prepare_runs, poll_seconds=poll_seconds)
                          if prepare_in_background else None)

    def start_preparing(self):
        """Starts the background thread now, before any request (the loader calls this).

        TensorBoard builds its plugins at start-up: preparing from then on means
        the page's first heatmap, asked right after it opens, finds the
        newest runs ready. Like a request, this keeps the thread for its idle
        time (`background.Preparer`).
        """
        if self._preparer is not None:
            # TensorBoard's experiment id for a --logdir is "".
            self._preparer.notice(context_lib.RequestContext(), "")

    def close(self):
        """Stops the background thread, if any (TensorBoard never calls this; tests do).

        Returns:
            True when no thread of this plugin is left running.
        """
        return self._preparer.close() if self._preparer is not None else True

    def get_plugin_apps(self):
        return {
            "/runs": self._serve_runs,
            "/heatmap": self._serve_heatmap,
            "/series": self._serve_series,
            "/profile": self._serve_profile,
            "/events": self._serve_events,
            "/classification": self._serve_classification,
            "/static/*": self._serve_static,
        }

    def is_active(self):
        return False  # the tab is enabled through data_plugin_names instead

    def data_plugin_names(self):
        return (fmt.PLUGIN_NAME,)

    def frontend_metadata(self):
        # The host's reload button does nothing for iframe plugins; the page polls itself.
        return base_plugin.FrontendMetadata(
            es_module_path="/static/index.js", tab_name="Gradients", disable_reload=True
        )

    # Routes: thin wrappers over the *_impl methods, which tests can call directly.

    @wrappers.Request.application
    def _serve_runs(self, request):
        return self._respond(request, lambda ctx, eid: self.runs_impl(ctx, eid))

    @wrappers.Request.application
    def _serve_heatmap(self, request):
        return self._respond(request, lambda ctx, eid: self.heatmap_impl(
            ctx, eid, run=_arg(request, "run"), stat=_arg(request, "stat"),
            columns=_int_arg(request, "columns", 1, MAX_COLUMNS, default=800), by=_by_arg(request),
        ))

    @wrappers.Request.application
    def _serve_series(self, request):
        return self._respond(request, lambda ctx, eid: self.series_impl(
            ctx, eid, run=_arg(request, "run"), stat=_arg(request, "stat"),
            name=request.args.get("name", ""),
            columns=_int_arg(request, "columns", 1, MAX_COLUMNS, default=1000), by=_by_arg(request),
        ))

    @wrappers.Request.application
    def _serve_profile(self, request):
        return self._respond(request, lambda ctx, eid: self.profile_impl(
            ctx, eid, run=_arg(request, "run"), stat=_arg(request, "stat"),
            step=_int_arg(request, "step", -(2**62), 2**62, default=None),
            step_end=_int_arg(request, "step_end", -(2**62), 2**62, default=None), by=_by_arg(request),
        ))

    @wrappers.Request.application
    def _serve_events(self, request):
        return self._respond(request, lambda ctx, eid: self.events_impl(ctx, eid, run=_arg(request, "run")))

    @wrappers.Request.application
    def _serve_classification(self, request):
        return self._respond(
            request, lambda ctx, eid: self.classification_impl(ctx, eid, run=_arg(request, "run"))
        )

    @wrappers.Request.application
    def _serve_static(self, request):
        # Only names listed from our own folder at start-up are served, so no
        # path (encoded, dotted, absolute, backslashed) can reach another file.
        marker = f"/plugin/{fmt.PLUGIN_NAME}/static/"
        name = request.path.split(marker, 1)[-1] if marker in request.path else ""
        path = self._static_files.get(name)
        if path is None:
            return http_util.Respond(request, "Not found", "text/plain", code=404)
        with open(path, "rb") as handle:
            content = handle.read()
        content_type = _CONTENT_TYPES[os.path.splitext(name)[1]]
        return http_util.Respond(request, content, content_type)

    def _respond(self, request, answer):
        """Calls `answer(ctx, experiment_id)`; a `BadRequest` becomes a 400 with its message."""
        ctx, eid = _context(request), _experiment(request)
        if self._preparer is not None:
            self._preparer.notice(ctx, eid, run=request.args.get("run") or None)
        try:
            body, code = answer(ctx, eid), 200
        except data_lib.BadRequest as error:
            body, code = {"error": str(error)}, 400
        text = json.dumps(json_util.Cleanse(body), sort_keys=True, separators=(",", ":"))
        return http_util.Respond(request, text, "application/json", code=code)

    # Implementations.

    def runs_impl(self, ctx, eid):
        """Lists runs with keras-vg data, and the one the page opens on.

        Returns:
            `{"runs": [{"run", "stats", "heatmap_stats", "has_events",
            "findings", "max_step", "wall_time", "error"}], "stats": <all
            known statistics>, "opening": <run>}`. `error` is set when a run
            was written in a newer format; `findings` counts the findings
            the monitor recorded while training (`alert`, `nonfinite` and
            `warning` events); `opening` is the newest run with findings,
            else the newest run (by the wall time of its latest record).
        """
        runs = []
        for run, names in sorted(self._reader.runs(ctx, eid).items()):
            error = None
            for time_series in names.values():
                try:
                    fmt.decode_metadata(time_series.plugin_content)
                except fmt.FormatError as format_error:
                    error = str(format_error)
            stats = [s for s in fmt.STATS if s in names]
            findings = 0
            if fmt.EVENTS_NAME in names and error is None:
                events, _ = self._reader.json_records(ctx, eid, run, fmt.EVENTS_NAME)
                findings = sum(isinstance(event, dict) and event.get("kind") in FINDING_EVENTS
                               for _, batch in events for event in (batch if isinstance(batch, list) else []))
            runs.append({
                "error": error,
                "findings": findings,
                "has_events": fmt.EVENTS_NAME in names,
                "heatmap_stats": [s for s in stats if s in HEATMAP_STATS],
                "max_step": max(int(ts.max_step) for ts in names.values()),
                "run": run,
                "stats": stats,
                "wall_time": max(float(ts.max_wall_time) for ts in names.values()),
            })
        shown = [r for r in runs if r["heatmap_stats"] and not r["error"]]
        newest_first = sorted(shown, key=lambda r: -r["wall_time"])
        with_findings = [r for r in newest_first if r["findings"]]
        opening = (with_findings or newest_first or [{"run": None}])[0]["run"]
        return {"opening": opening, "runs": runs, "stats": list(fmt.STATS)}

    def heatmap_impl(self, ctx, eid, run, stat, columns, by="layer"):
        """Layers (or variables) x step buckets of one statistic, downsampled keeping extremes.

        Args:
            by: `"layer"` or `"variable"`: the rows of a per-variable
                statistic. Per-layer statistics have layer rows either way.

        Returns:
            A dict with `names` (rows, model order, input first), `rows`
            (`"layer"` or `"variable"`), `row_variables` (for layer rows of
            a per-variable statistic, the variables of each row; else None),
            `step_start` and `step_end` per column, `values` (base64 int16
            log10 codes, `[rows, columns]`, see `downsample.encode_log16`),
            `nan_is_absent` (whether NaN means "no value" rather than
            non-finite), `classes` (`keras_vg.detect` codes of the same
            shape, see `downsample.encode_regions`), `regions` (class names
            by code), `precedence` (codes, most serious first), `marked`
            (the codes this statistic's cells can have, most serious first),
            `marks` (class name -> pattern), `outlined` and `ringed` (the
            class names whose regions are also outlined, and whose tiny
            cells are ringed), `scale` (`"log"`, or
            `"linear"` for the fractions), `downsampled`, `reduction`,
            `num_steps` and `retention`.
        """
        _check_heatmap_stat(stat)
        series = self._reader.series(ctx, eid, run, stat, by=by)
        rows, steps = series.values.shape[0], len(series.steps)
        columns = min(columns, max(1, MAX_CELLS // max(1, rows)))
        starts = downsample.bucket_starts(steps, columns)
        values = downsample.reduce_values(series.values, starts, stat)
        classes = heatmap_marks.worst_in_runs(self._aligned(ctx, eid, run, series), starts, axis=1)
        return {
            "classes": downsample.encode_regions(classes),
            "columns": len(starts),
            "downsampled": len(starts) < steps,
            "encoding": {"scale": downsample.LOG16_SCALE, "special": downsample.SPECIAL_CODES},
            "marked": list(heatmap_marks.classes_shown(stat)),
            "marks": heatmap_marks.MARKS,
            "names": series.names,
            "nan_is_absent": stat in heatmap_marks.NAN_IS_ABSENT,
            "num_steps": steps,
            "outlined": sorted(heatmap_marks.OUTLINED),
            "precedence": list(heatmap_marks.precedence()),
            "reduction": _reduction_text(stat),
            "regions": list(_detect().CLASS_NAMES),
            "retention": series.retention,
            "ringed": sorted(heatmap_marks.RINGED),
            "row_variables": _row_variables(series),
            "rows": "variable" if fmt.axis_of(stat) == fmt.AXIS_VARIABLE and by == "variable" else "layer",
            "run": run,
            "scale": "linear" if stat in fmt.ACTIVATION_STATS else "log",
            "stat": stat,
            "step_end": _bucket_ends(series.steps, starts).tolist(),
            "step_start": series.steps[starts].tolist() if steps else [],
            "values": downsample.encode_log16(values),
        }

    def series_impl(self, ctx, eid, run, stat, name, columns, by="layer"):
        """One layer's (or variable's, or the scalar's) values over the steps.

        Returns:
            A dict with `steps` (bucket starts), `step_end`, `max` and `min`
            per bucket (equal when not downsampled), `downsampled`,
            `retention`.
        """
        series = self._reader.series(ctx, eid, run, stat, by=by)
        row = series.values[series.row(name):][:1]
        starts = downsample.bucket_starts(len(series.steps), columns)
        high = downsample.reduce_values(row, starts, stat)[0]
        with np.errstate(invalid="ignore"):
            low = -downsample.reduce_values(-row, starts, stat)[0]
        return {
            "downsampled": len(starts) < len(series.steps),
            "max": _floats(high),
            "min": _floats(low),
            "name": name,
            "retention": series.retention,
            "run": run,
            "stat": stat,
            "step_end": _bucket_ends(series.steps, starts).tolist(),
            "steps": series.steps[starts].tolist() if len(series.steps) else [],
        }

    def profile_impl(self, ctx, eid, run, stat, step, step_end=None, by="layer"):
        """Every layer's (or variable's) value at one step, or its bucket value over a step range.

        Args:
            step: The step; the nearest recorded one is used. None: the last.
            step_end: With `step`, reduce over the recorded steps in
                `[step, step_end]` as the heatmap does (max, NaN or inf
                win), so a clicked heatmap column shows the same values.
            by: `"layer"` or `"variable"`, as for `heatmap_impl`.

        Returns:
            A dict with `names`, `values`, `step` and `step_end` (the
            recorded steps used).
        """
        _check_heatmap_stat(stat)
        series = self._reader.series(ctx, eid, run, stat, by=by)
        steps = series.steps
        answer = {"names": series.names, "run": run, "stat": stat, "step": None, "step_end": None,
                  "values": []}
        if not len(steps):
            return answer
        if step is None:
            first = last = len(steps) - 1
        elif step_end is not None and step_end >= step and ((steps >= step) & (steps <= step_end)).any():
            inside = np.flatnonzero((steps >= step) & (steps <= step_end))
            first, last = int(inside[0]), int(inside[-1])
        else:
            first = last = int(np.argmin(np.abs(steps - step)))
        values = downsample.reduce_values(series.values[:, first:last + 1], np.array([0]), stat)[:, 0]
        answer.update(step=int(steps[first]), step_end=int(steps[last]), values=_floats(values))
        return answer

    def events_impl(self, ctx, eid, run):
        """Clipping on/off, skipped steps and alerts, sorted by step."""
        records, retention = self._reader.json_records(ctx, eid, run, fmt.EVENTS_NAME)
        events = []
        for step, batch in records:
            for event in batch if isinstance(batch, list) else []:
                if isinstance(event, dict):
                    events.append(dict(event, step=_int_or(event.get("step"), step)))
        events.sort(key=lambda event: event["step"])
        return {"events": events, "retention": retention, "run": run}

    def classification_impl(self, ctx, eid, run):
        """Region episodes of a run, by the rules of `keras_vg.detect`."""
        result = self._classify(ctx, eid, run)
        return {"episodes": result["episodes"], "run": run}

    # Preparation, done by the background thread ahead of requests.

    def prepare_runs(self, ctx, eid, requested):
        """Prepares up to `PREPARED_RUNS` runs: those requested lately, then those with the newest data.

        Args:
            ctx: A `RequestContext` for the data provider.
            eid: The experiment id.
            requested: Runs named by requests, the most recent first.

        Returns:
            The runs prepared.
        """
        listing = self._reader.runs(ctx, eid)
        chosen = [run for run in requested if run in listing][:PREPARED_RUNS]
        # Before a run was shown (or beside it), the one being written now is
        # the one whose next answer would be slow.
        newest = sorted(listing, key=lambda run: -max(ts.max_wall_time for ts in listing[run].values()))
        chosen += [run for run in newest if run not in chosen][:PREPARED_RUNS - len(chosen)]
        for run in chosen:
            self.prepare(ctx, eid, run)
        return chosen

    def prepare(self, ctx, eid, run):
        """Stacks every statistic of a run (layer and variable rows) and classifies it, as the next heatmap needs.

        Does nothing that is already done for the data TensorBoard has now.
        """
        try:
            self._classify(ctx, eid, run)
            for stat in self._reader.runs(ctx, eid).get(run, {}):
                if stat not in HEATMAP_STATS:
                    continue
                for by in heatmap_marks.VIEWS:  # the page opens per layer; variables are one click away
                    try:
                        self._aligned(ctx, eid, run, self._reader.series(ctx, eid, run, stat, by=by))
                    except data_lib.BadRequest:
                        continue  # e.g. update_ratio without weight_norm has no layer rows
        except data_lib.BadRequest:
            pass  # the run is gone, or in a newer format: the page shows why

    # Classification, shared by /heatmap and /classification.

    def _classify(self, ctx, eid, run):
        """Runs `keras_vg.detect` over every statistic of the run (cached per data version)."""
        listing = self._reader.runs(ctx, eid)
        if run not in listing:
            raise data_lib.BadRequest(f"Unknown run. Received: run={run!r}")
        stats = {
            name: self._reader.series(ctx, eid, run, name)
            for name in listing[run] if name in fmt.STAT_AXES
        }
        # The model summary says which variables make a layer and which decide (keras_vg.detect.Structure).
        models, _ = self._reader.json_records(ctx, eid, run, fmt.MODEL_NAME)
        model = models[-1][1] if models else None
        key = tuple(sorted((name, series.version) for name, series in stats.items())) + (len(models),)
        # One classification per run at a time: a request waits for the
        # background thread's instead of running the rules twice.
        with self._classifying.hold((eid, run)):
            with self._lock:
                cached = self._classifications.get((eid, run))
            if cached is not None and cached[0] == key:
                return cached[1]
            result = _classification(stats, model)
            with self._lock:
                self._classifications[(eid, run)] = (key, result)
                self._classifications.move_to_end((eid, run))
                while len(self._classifications) > CLASSIFICATION_CACHE:
                    self._classifications.popitem(last=False)
        return result

    def _aligned(self, ctx, eid, run, series):
        """The run's class codes on a series' rows and steps, `[rows, T]` (cached)."""
        result = self._classify(ctx, eid, run)
        key = (series.name, series.variable_layers is not None)
        with self._lock:
            aligned = result["aligned"].get(key)
        if aligned is None or aligned[0] != series.version:
            # Cached with the classification: aligning 20,000 x 1,000 cells costs ~0.2 s.
            if series.variable_layers is None:
                codes = heatmap_marks.cell_classes(result["grids"], series.name, series.steps, series.names)
            else:
                codes = heatmap_marks.cell_classes(result["grids"], series.name, series.steps,
                                                   series.variable_names, layers=series.variable_layers)
            aligned = (series.version, np.ascontiguousarray(codes.T))
            with self._lock:
                result["aligned"][key] = aligned
        return aligned[1]


def _classification(stats, model=None):
    """What `_classify` caches: the codes of `keras_vg.detect.classify` and its episodes."""
    detect = _detect()
    inputs = {
        name: (s.steps, s.names, s.values[0] if not s.names else s.values.T)
        for name, s in stats.items()
    }
    classification = detect.classify(inputs, model=model if isinstance(model, dict) else None)
    return {
        # Only the codes are kept: the full Classification also holds float
        # figures for every cell, 5x the memory.
        "grids": types.SimpleNamespace(variables=_slim(classification.variables),
                                       layers=_slim(classification.layers)),
        "episodes": [_episode_json(e) for e in detect.find_episodes(classification)],
        "aligned": {},  # (statistic, layer rows?) -> (series version, codes on its rows and steps)
    }


def _detect():
    # Imported on first use: the rules live in keras_vg.detect alone, and
    # TensorBoard's start-up does not pay for them.
    from keras_vg import detect

    return detect


def _slim(grid):
    """The part of a `keras_vg.detect.Grid` the heatmap needs: steps, names, int8 codes."""
    return types.SimpleNamespace(steps=np.asarray(grid.steps), names=tuple(grid.names),
                                 codes=np.asarray(grid.codes, dtype=np.int8))


def _row_variables(series):
    """For layer rows of a per-variable statistic, the variables of each row (in order); else None."""
    if series.variable_layers is None:
        return None
    rows = {name: [] for name in series.names}
    for variable, layer in zip(series.variable_names, series.variable_layers):
        rows[layer].append(variable)
    return [rows[name] for name in series.names]


def _check_heatmap_stat(stat):
    if stat not in HEATMAP_STATS:
        raise data_lib.BadRequest(f"`stat` must be one of {list(HEATMAP_STATS)}. Received: stat={stat!r}")


def _episode_json(episode):
    return {
        "first_step": int(episode.first_step),
        "kind": episode.kind,
        "last_step": int(episode.last_step),
        "message": episode.message,
        "names": list(episode.names),
        "scope": episode.scope,
    }


def _reduction_text(stat):
    if stat in heatmap_marks.NAN_IS_ABSENT:
        return "max of the defined values per bucket"
    return "max per bucket; NaN or inf anywhere in the bucket wins"


def _bucket_ends(steps, starts):
    if not len(steps):
        return np.zeros(0, dtype=np.int64)
    return steps[np.append(starts[1:] - 1, len(steps) - 1)]


def _floats(array):
    return [float(v) for v in np.asarray(array, dtype=np.float64)]


def _int_or(value, default):
    try:
        return int(value)
    except (TypeError, ValueError):
        return int(default)


def _arg(request, name):
    value = request.args.get(name)
    if not value:
        raise data_lib.BadRequest(f"Missing query parameter `{name}`.")
    return value


def _by_arg(request):
    by = request.args.get("by") or "layer"
    try:
        heatmap_marks.check_view(by)
    except ValueError as error:
        raise data_lib.BadRequest(str(error)) from None
    return by


def _int_arg(request, name, low, high, default):
    value = request.args.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise data_lib.BadRequest(f"`{name}` must be an integer. Received: {name}={value!r}") from None
    if not low <= number <= high:
        raise data_lib.BadRequest(f"`{name}` must be in [{low}, {high}]. Received: {name}={value!r}")
    return number


def _context(request):
    from tensorboard import plugin_util

    return plugin_util.context(request.environ)


def _experiment(request):
    from tensorboard import plugin_util

    return plugin_util.experiment_id(request.environ)


def _list_static_files():
    files = {}
    for name in sorted(os.listdir(STATIC_DIR)):
        path = os.path.join(STATIC_DIR, name)
        if os.path.isfile(path) and os.path.splitext(name)[1] in _CONTENT_TYPES:
            files[name] = path
    return files
