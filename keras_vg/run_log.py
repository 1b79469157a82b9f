"""`RunLog`: what keras-vg's callbacks on one model share while it trains.

`GradientMonitor` and `AutoClip` are separate callbacks, but their records
belong in one TensorBoard run, on one step axis, and the monitor's live
warnings need to know which steps AutoClip skipped. They meet here, the way
Composer's callbacks all write into the trainer's logger: each gets the same
`RunLog` from the model it is set on (`RunLog.of(model)`), not from a
module-level registry, and neither imports the other. This module imports
neither TensorFlow nor JAX: the monitor on any backend can use it.

The order of flushes is fixed by the run, not by the order of the callbacks
in `fit`:

1. the owner (a `GradientMonitor`) opens the run with its writer, and sets
   the step offset once it knows it (at the first batch of a compile);
2. at each of the owner's reads, `flush_sources()` has every source (an
   `AutoClip`) write what its device buffers hold, on the owner's step axis,
   *before* the owner writes and judges its own records, so that the skipped
   steps reach the owner's detector in the same batch (`take_skipped()`);
3. at the end of `fit` the owner flushes the sources a last time, then
   closes the run (`close`) and its writer: whichever callback's
   `on_train_end` comes first, nothing is lost.

Sources may also write at their own cadence in between, once the offset is
known; what they write before it is known stays in their device buffers.

Example:

>>> class Source:
...     def flush_into_run(self, run):
...         run.add_skipped([(run.logged(3), 1.0)])
>>> run = RunLog()
>>> source = Source()
>>> run.join(source)
>>> run.open(owner="monitor", writer=None, with_global_norm=False, wants_skipped=True)
>>> run.offset = 100  # the run's earlier fits recorded steps 0-99
>>> run.flush_sources()
>>> run.take_skipped()
[(103, 1.0)]
"""

MODEL_ATTRIBUTE = "_keras_vg_run_log"
"""The model attribute that holds its `RunLog` (set past Keras's attribute tracking)."""


class RunLog:
    """One model's keras-vg run while it trains: who writes, on which step axis, and in which order.

    Attributes:
        owner: The callback that owns the writer (a `GradientMonitor`), or
            None while no one does.
        writer: The owner's `keras_vg.event_writer.EventWriter`, or None.
        with_global_norm: Whether sources must write the pre-clip
            `global_grad_norm` themselves (the owner does not record it).
        offset: What to add to the optimizer's `iterations` to get the step
            written (a recompile restarts `iterations` at 0, but the steps of
            one `log_dir` only go forward); None until the owner knows it.
        sources: The callbacks that write into the owner's run (`AutoClip`).
    """

    def __init__(self):
        self.owner = None
        self.writer = None
        self.with_global_norm = False
        self.offset = None
        self.sources = []
        self._wants_skipped = False
        self._skipped = []

    @classmethod
    def of(cls, model):
        """Returns the model's `RunLog`, making it on first use.

        Args:
            model: A Keras model.

        Returns:
            The same `RunLog` for every call with the same model.
        """
        run = model.__dict__.get(MODEL_ATTRIBUTE)
        if run is None:
            run = cls()
            # Past Keras's attribute tracking: a plain Python object, not part of the model's state.
            object.__setattr__(model, MODEL_ATTRIBUTE, run)
        return run

    # The owner ---------------------------------------------------------------------

    def open(self, owner, writer, with_global_norm, wants_skipped):
        """The owner starts a `fit`: sources write into `writer` from the step offset on.

        Args:
            owner: The owning callback.
            writer: Its `EventWriter`.
            with_global_norm: True where the owner does not record the
                pre-clip global norm itself.
            wants_skipped: True where the owner judges AutoClip's skipped
                steps (`take_skipped`).
        """
        self.owner, self.writer = owner, writer
        self.with_global_norm = bool(with_global_norm)
        self._wants_skipped = bool(wants_skipped)
        self._skipped = []

    def close(self, owner):
        """The owner ends its `fit`: sources stop writing into its writer (which it closes itself)."""
        if self.owner is owner:
            self.owner = self.writer = self.offset = None
            self._wants_skipped = False
            self._skipped = []

    def is_open(self):
        """Whether sources may write into the owner's run now (a writer, and a known offset)."""
        return self.writer is not None and self.offset is not None

    def logged(self, iterations):
        """The step written for an optimizer step (`iterations`), on the owner's axis."""
        return int(iterations) + self.offset

    def flush_sources(self):
        """Has every source write what it holds now, in the order they joined."""
        for source in list(self.sources):
            source.flush_into_run(self)

    def take_skipped(self):
        """Returns and forgets the `(step, skipped count)` records the sources wrote since the last call.

        Returns:
            A list of `(logged step, count)`, steps increasing: AutoClip's
            `skipped` records (counts since its previous record).
        """
        taken, self._skipped = sorted(self._skipped), []
        return taken

    # The sources -----------------------------------------------------------------------

    def join(self, source):
        """Adds a source (one per kind: a new `AutoClip` replaces the model's previous one)."""
        self.sources = [s for s in self.sources if s is source or type(s) is not type(source)]
        if source not in self.sources:
            self.sources.append(source)

    def leave(self, source):
        """Removes a source."""
        self.sources = [s for s in self.sources if s is not source]

    def has_source(self, source):
        """Whether `source` writes into this run."""
        return any(s is source for s in self.sources)

    def add_skipped(self, records):
        """A source hands over its `(logged step, skipped count)` records, for the owner's detector."""
        if self._wants_skipped:
            self._skipped.extend(records)
