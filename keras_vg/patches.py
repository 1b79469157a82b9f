"""Hooks on live objects, each undone in the reverse order it was made.

The taps wrap methods of one optimizer, one model and its layers, never of
their classes, so another model in the same process is left as it was.
"""


class Patches:
    """Instance-method wrappers and other undoable hooks.

    Example:

    >>> class Layer:
    ...     def call(self, x):
    ...         return x
    >>> layer, patches = Layer(), Patches()
    >>> patches.wrap(layer, "call", lambda original: lambda x: original(x) + 1)
    >>> layer.call(1)
    2
    >>> other = Patches()
    >>> other.wrap(layer, "call", lambda original: lambda x: original(x) * 10)
    >>> patches.undo_all()       # undone below another hook: that one stays, this one passes through
    >>> layer.call(1)
    10
    >>> other.undo_all()
    >>> layer.call(1), bool(patches)
    (1, False)
    """

    def __init__(self):
        self._undo = []

    def wrap(self, obj, attribute, make_wrapper):
        """Replaces `obj.attribute` on the instance by `make_wrapper(original)`.

        Args:
            obj: The object whose method is wrapped (its class is not touched).
            attribute: The method's name.
            make_wrapper: A function of the original bound method returning
                its replacement.
        """
        own = obj.__dict__.get(attribute)  # an instance attribute (another hook) to put back on undo
        original = getattr(obj, attribute)
        replacement = make_wrapper(original)
        active = [True]

        def wrapper(*args, **kwargs):
            # Undone while another hook made since still holds it: it passes straight through.
            return (replacement if active[0] else original)(*args, **kwargs)

        setattr(obj, attribute, wrapper)

        def undo():
            active[0] = False
            if obj.__dict__.get(attribute) is wrapper:  # on top: the hook below it comes back
                if own is None:
                    delattr(obj, attribute)
                else:
                    setattr(obj, attribute, own)

        self._undo.append(undo)

    def add(self, undo):
        """Keeps `undo`, a function of no arguments that removes a hook made elsewhere."""
        self._undo.append(undo)

    def undo_all(self):
        """Undoes every hook, the newest first. Idempotent."""
        while self._undo:
            self._undo.pop()()

    def __bool__(self):
        return bool(self._undo)
