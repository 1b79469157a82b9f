"""Thread helpers of the plugin: one computation per key, and a background preparer.

TensorBoard's data provider hands out whole series only, and turning a
1,000-variable x 20,000-step run into arrays and region codes takes seconds,
more than a request may take. So the plugin prepares that work in a
background thread as soon as TensorBoard has new data (`Preparer`), and a
request that arrives while the same work is under way waits for it instead of
doing it twice (`KeyedLocks`).
"""

import contextlib
import logging
import threading
import time
import weakref

logger = logging.getLogger(__name__)


class KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it.

    Example:

    >>> locks = KeyedLocks()
    >>> with locks.hold(("run1", "grad_norm")):
    ...     pass
    """

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}  # key -> [lock, number of holders and waiters]

    @contextlib.contextmanager
    def hold(self, key):
        """Holds the lock of `key` for the `with` block."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


class Preparer:
    """Calls `prepare(ctx, eid, runs)` every `poll_seconds` in a daemon thread while requests come.

    The thread starts with the first `notice` (the plugin's loader gives one
    at TensorBoard's start-up, each request another) and ends when none came
    for `idle_seconds`, on `close()`, or when the owner of `prepare` is
    garbage collected (only a weak reference to it is kept), so it never
    outlives a plugin. After a pass that took `d` seconds it waits at least
    `d` more, so preparing takes at most about half of one core.

    Args:
        prepare: A bound method `prepare(ctx, eid, runs)`; `runs` lists the
            runs requested lately, the most recent first. Its exceptions are
            logged, never raised.
        poll_seconds: Seconds between two passes.
        idle_seconds: Seconds without a request after which the thread ends.

    Example:

    >>> preparer = Preparer(plugin.prepare_runs)   # doctest: +SKIP
    >>> preparer.notice(ctx, "", run="run1")        # doctest: +SKIP
    >>> preparer.close()                            # doctest: +SKIP
    """

    def __init__(self, prepare, poll_seconds=2.0, idle_seconds=1800.0):
        self._prepare = weakref.WeakMethod(prepare)
        self._poll_seconds = poll_seconds
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self._last_request = 0.0
        self._contexts = {}  # eid -> the RequestContext of its latest request
        self._requested = {}  # (eid, run) -> time of its latest request

    def notice(self, ctx, eid, run=None):
        """Records a request, and starts the thread if it is not running.

        Args:
            ctx: The request's `RequestContext`, reused for background reads.
            eid: The experiment id.
            run: The run the request named, if any.
        """
        now = time.monotonic()
        with self._lock:
            if self._stop.is_set():
                return
            self._last_request = now
            self._contexts[eid] = ctx
            if run is not None:
                self._requested[(eid, run)] = now
            if self._thread is None or not self._thread.is_alive():
                # Passed by value: the thread must not keep `self` (and so the plugin) alive.
                self._thread = threading.Thread(
                    target=_loop, args=(weakref.ref(self),), name="keras-vg-prepare", daemon=True
                )
                self._thread.start()

    def close(self, timeout=30.0):
        """Stops the thread (after its current pass) and waits for it.

        Returns:
            True when no thread is left running.
        """
        with self._lock:
            self._stop.set()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def running(self):
        """Whether the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _work(self):
        """One pass; returns False when the thread should end."""
        prepare = self._prepare()
        with self._lock:
            idle = time.monotonic() - self._last_request > self._idle_seconds
            if self._stop.is_set() or prepare is None or idle:
                self._thread = None
                return False
            # Forget runs not asked for in a while: they are no longer on a page.
            cutoff = time.monotonic() - self._idle_seconds
            self._requested = {key: when for key, when in self._requested.items() if when > cutoff}
            by_eid = {}
            for eid, run in sorted(self._requested, key=self._requested.get, reverse=True):
                by_eid.setdefault(eid, []).append(run)
            jobs = [(ctx, eid, by_eid.get(eid, [])) for eid, ctx in self._contexts.items()]
        for ctx, eid, runs in jobs:
            try:
                prepare(ctx, eid, runs)
            except Exception:  # noqa: BLE001 -- a failed pass must not end the thread
                logger.exception("keras-vg: preparing the Gradients tab's data failed")
        return True


def _loop(preparer_ref):
    """The thread: a pass, then a pause of `poll_seconds` (or the pass's length, if longer)."""
    while True:
        preparer = preparer_ref()
        if preparer is None:
            return
        started = time.monotonic()
        if not preparer._work():
            return
        pause = max(preparer._poll_seconds, time.monotonic() - started)
        wake, stop = preparer._wake, preparer._stop
        del preparer  # sleep without holding it, so it can be collected
        wake.wait(pause)
        wake.clear()
        if stop.is_set():
            return
