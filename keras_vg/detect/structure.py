"""Which layer each variable belongs to, and which variables decide its layer's verdict.

The gradient rules judge layers along the network's depth, and a layer's
kernels carry its verdict (`Structure`); a variable's role in its layer comes
from the model summary or, without one, from its name (`variable_role`).

Example:

>>> structure = Structure(["dense/kernel", "dense/bias", "out/kernel"])
>>> structure.units, structure.roles
(('dense', 'out'), ('kernel', 'bias', 'kernel'))
"""

import numpy as np

from keras_vg.activations import NEVER_DEAD
from keras_vg.detect.kernels import _empty

ROLES = ("kernel", "bias", "scale", "offset", "vector")
"""Variable roles (`variable_role`); only kernels carry a layer's verdict."""


def variable_role(path, rank=None):
    """The role of a variable in its layer, from its name and, where known, its rank.

    Args:
        path: The variable's path (`dense/kernel`) or name.
        rank: The number of its dimensions, or None if unknown. Defaults to
            `None`.

    Returns:
        `"bias"`, `"scale"` (a normalisation's gamma), `"offset"` (its
        beta), `"kernel"` (a weight matrix or tensor: rank 2 or more, or any
        other name where the rank is unknown) or `"vector"` (another
        variable of rank 0 or 1, e.g. PReLU's alpha).

    Example:

    >>> variable_role("dense/kernel"), variable_role("bn/beta"), variable_role("mha/key/bias", 2)
    ('kernel', 'offset', 'bias')
    """
    name = str(path).rsplit("/", 1)[-1]
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    if name in ("gamma", "scale"):
        return "scale"
    if name in ("beta", "offset"):
        return "offset"
    if name == "alpha" or (rank is not None and rank < 2):
        return "vector"
    return "kernel"


def _parent(path):
    """A variable's layer where no summary says: its path's parent (`model/dense/kernel` -> `model/dense`)."""
    return str(path).rsplit("/", 1)[0]


class Structure:
    """How the variables make layers: the unit of judgement of the gradient rules.

    A *unit* is a layer with at least one kernel whose gradient is not zero by
    construction. Its grad norm is the root of the sum of squares of those
    kernels' norms; its update ratio ‖Δw‖/‖w‖ is taken over them together.
    Every variable of the layer (biases too) gets the unit's verdict, except
    structural zeros.

    Args:
        names: The variable paths, in model order.
        model: The model summary (`keras_vg.model_summary`), or None: then a
            variable's layer is its path's parent and its role follows its
            name. Defaults to `None`.

    Attributes:
        names: The variable paths.
        layers: Each variable's layer name.
        roles: Each variable's role (`ROLES`).
        units: The units' layer names, in model order.
        unit_of: int `[N]`, each variable's unit, or -1 (none, or a
            structural zero).
        structural: `{path: entry}` of the summary's `structural_zeros`.
        activations: `{layer: activation}` from the summary.
        outputs: The summary's output layers.
    """

    def __init__(self, names, model=None):
        self.names = tuple(names)
        model = model if isinstance(model, dict) else {}
        layer_of, role_of = {}, {}
        self.activations, self._inbound = {}, {}
        for entry in model.get("layers", []):
            self.activations[entry.get("name")] = entry.get("activation")
            self._inbound[entry.get("name")] = entry.get("inbound")
            roles = entry.get("roles") or [None] * len(entry.get("variables", []))
            for path, role in zip(entry.get("variables", []), roles):
                layer_of[path], role_of[path] = entry.get("name"), role
        self.structural = {z.get("variable"): z for z in model.get("structural_zeros", []) or []
                           if isinstance(z, dict)}
        self.outputs = frozenset(model.get("outputs", []) or [])
        self.layers = tuple(layer_of.get(n) or _parent(n) for n in self.names)
        self._layer_of = dict(zip(self.names, self.layers))
        self.roles = tuple(role_of.get(n) or variable_role(n) for n in self.names)
        judged = np.array([r == "kernel" and n not in self.structural
                           for n, r in zip(self.names, self.roles)], bool)
        self.units = tuple(dict.fromkeys(layer for layer, j in zip(self.layers, judged) if j))
        index = {layer: i for i, layer in enumerate(self.units)}
        self.unit_of = np.array([-1 if n in self.structural else index.get(layer, -1)
                                 for n, layer in zip(self.names, self.layers)], np.int64)
        # The kernels of each unit, contiguous: `reduceat` sums them in one pass.
        kernels = np.flatnonzero(judged)
        order = np.argsort(self.unit_of[kernels], kind="stable")
        self._kernels = kernels[order]
        self._starts = np.flatnonzero(np.diff(np.concatenate([[-1], self.unit_of[self._kernels]])))
        self._single = len(self._kernels) == len(self.units)  # one kernel per unit: its own values
        self._members = np.flatnonzero(self.unit_of >= 0)
        self._identity = np.array_equal(self.unit_of, np.arange(len(self.names)))

    def unit_norms(self, norm):
        """Each unit's grad norm `[T, U]` from the variables' `[T, N]`: root of the kernels' sum of squares."""
        if self._identity:  # every variable is a layer's only kernel
            return norm
        # Row-major, as the window minima's passes over rows want it (a column gather is not).
        x = np.take(norm, self._kernels, axis=1)
        if self._single or not x.shape[1]:
            return x
        with np.errstate(over="ignore", invalid="ignore"):
            return np.sqrt(np.add.reduceat(np.square(x.astype(np.float64)), self._starts, axis=1)
                           ).astype(np.float32)

    def unit_updates(self, update, weight):
        """Each unit's update ratio `[T, U]`: ‖Δw‖/‖w‖ over its kernels together.

        An undefined ratio (NaN: the weights' norm was 0) leaves that kernel
        out. Without `weight_norm`, the largest kernel ratio stands in.
        """
        if self._identity:
            return update
        r = np.take(update, self._kernels, axis=1)
        if self._single or not r.shape[1]:
            return r
        defined = ~np.isnan(r)
        with np.errstate(invalid="ignore", over="ignore"):
            if weight is None:
                return np.fmax.reduceat(r, self._starts, axis=1)
            w = np.where(defined, weight[:, self._kernels], 0.0).astype(np.float64)
            step = np.add.reduceat(np.square(np.where(defined, r, 0.0) * w), self._starts, axis=1)
            size = np.add.reduceat(np.square(w), self._starts, axis=1)
            ratio = np.sqrt(step) / np.sqrt(size)
        return np.where(size > 0, ratio, np.nan).astype(np.float32)

    def broadcast(self, verdicts, shape):
        """Gives each unit's verdict `[T, U]` to its variables: `(codes, rules, figures)` `[T, N]`."""
        if self._identity:  # every variable is a layer's only kernel: the verdicts are the variables'
            return verdicts
        out = _empty(shape)
        if not verdicts[1].any():
            return out
        if len(self._members):
            units = self.unit_of[self._members]
            for target, source in zip(out, verdicts):
                target[:, self._members] = source[:, units]
        return out

    def layer_guards(self, layer_names):
        """`(may_die, may_saturate)`, bool `[L]` for per-layer statistics' columns.

        A leaky ReLU or PReLU unit always passes gradient (never dead); an
        output layer's sigmoid or softmax saturates by design as a classifier
        grows confident (never saturated).
        """
        may_die = np.array([self.activations.get(n) not in NEVER_DEAD for n in layer_names], bool)
        may_saturate = np.array([n not in self.outputs for n in layer_names], bool)
        return may_die, may_saturate

    def graph_known(self, layer):
        """Whether the summary read this layer's place in the model's graph (its `inbound` layers)."""
        return self._inbound.get(layer) is not None

    def layers_of(self, names):
        """The layers of these variables, each once, in the order of `names`."""
        layer_of = self._layer_of
        return list(dict.fromkeys(layer_of.get(n) or _parent(n) for n in names))
