"""The layer registry: one entry per kind of private layer, holding together its conversion
from Keras, its value bounds and its private forward step.

An entry is a :class:`Kind` subclass decorated with :func:`register`. It names the Keras
classes it converts (``keras``) and the kind it emits into the public spec (``kind``):

- ``convert(ctx, layer, cfg)`` (model owner, numpy): turn one Keras layer into spec nodes with
  ``ctx.add(...)`` and return the id of the node holding the layer's output (or the id of its
  input, for layers that are the identity at inference);
- ``bounds(node, ws, *ins)`` (model owner, numpy): from an interval ``(lo, hi)`` per input,
  each bound an array of the input's shape without the batch dimension, the output's
  ``interval(lo, hi, peak)``, ``peak`` being the largest magnitude of any value before its
  truncation (by default the output's);
- ``forward(prot, node, ws, *xs)`` (worker 0, tracing the private step): the output from the
  private inputs, with TF Encrypted's ABY3 protocol ``prot``.

``node`` is the node's public description (a dict: ``kind``, ``name``, ``inputs``,
``params``, ``shape`` without the batch dimension, Keras layout); ``ws`` its weights (numpy
arrays at the owner, private tensors on the workers). Inside the private step, 4-D tensors are
kept in NCHW (as TF Encrypted's convolutions and pools want them) and all others in Keras'
layout; :func:`keras_layout` and :func:`private_layout` convert.

Every module of this package is imported here, so a new layer kind is one new file (or one
new class in the file of its family). Nothing here imports TensorFlow: clients import the
package for nothing, the owner uses conversion and bounds, only worker 0 runs ``forward``.
"""

import importlib
import pkgutil

import numpy as np

INPUT = -1  # the id of the model's input in a node's ``inputs``

_BY_KIND = {}
_BY_KERAS = {}


class Kind:
    """Base of the registry's entries (see the module docstring)."""

    kind = None  # the node kind this entry emits and evaluates (None: convert only)
    keras = ()  # the Keras layer classes this entry converts
    linear = False  # kernel + bias, output channels on the kernel's last axis
    homogeneous = False  # f(c * x) = c * f(x) for every c > 0 (a scale may pass through)
    supported = None  # how the README and errors describe it (default: the Keras names)

    def convert(self, ctx, layer, cfg):
        raise NotImplementedError

    def bounds(self, node, ws, *ins):
        raise NotImplementedError

    def forward(self, prot, node, ws, *xs):
        raise NotImplementedError


class BoundError(ValueError):
    """Raised by an entry's ``bounds`` when the layer cannot be evaluated exactly on inputs
    of the given range (the range check names the layer)."""


def register(cls):
    """Class decorator: add an entry to the registry (one instance per class)."""
    entry = cls()
    if entry.kind is not None:
        if entry.kind in _BY_KIND:
            raise RuntimeError("layer kind {!r} registered twice".format(entry.kind))
        _BY_KIND[entry.kind] = entry
    for name in entry.keras:
        if name in _BY_KERAS:
            raise RuntimeError("Keras layer {!r} registered twice".format(name))
        _BY_KERAS[name] = entry
    return cls


def exact_output(kinds_in_order):
    """True when the last node (kinds in evaluation order) is a product the workers leave
    untruncated: a linear layer's output is re-shared and returned at double scale, and
    the client, who reconstructs it, divides by 2^2f itself (exact, and two rounds fewer)."""
    return bool(kinds_in_order) and by_kind(kinds_in_order[-1]).linear


def by_kind(kind):
    """The entry evaluating node kind ``kind`` (KeyError if unknown)."""
    return _BY_KIND[kind]


def kinds():
    """Every node kind a public spec may hold."""
    return sorted(_BY_KIND)


def by_keras(class_name):
    """The entry converting Keras layer class ``class_name``, or None."""
    return _BY_KERAS.get(class_name)


def supported_layers():
    """How each supported Keras layer is described to users, sorted."""
    seen = []
    for entry in _BY_KERAS.values():
        for text in (entry.supported or entry.keras):
            if text not in seen:
                seen.append(text)
    return tuple(sorted(seen, key=str.lower))


# -- shared by the entries ------------------------------------------------------------------
def pair(value):
    """An int or a pair of ints as a tuple of two ints."""
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def single(value):
    """An int or a 1-tuple as an int (Keras 1-D layers store sizes as tuples)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError("expected one value, got {!r}".format(value))
        return int(value[0])
    return int(value)


def private_layout(prot, x):
    """A private tensor in Keras' layout (NHWC) to the step's layout (NCHW for 4-D)."""
    return prot.transpose(x, perm=[0, 3, 1, 2]) if len(x.shape) == 4 else x


def keras_layout(prot, x):
    """The inverse of :func:`private_layout`."""
    return prot.transpose(x, perm=[0, 2, 3, 1]) if len(x.shape) == 4 else x


def interval(lo, hi, peak=None):
    """An entry's bounds result: ``(lo, hi, peak)``; ``peak`` defaults to max(|lo|, |hi|)."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    top = float(max(np.abs(lo).max(initial=0.0), np.abs(hi).max(initial=0.0)))
    return lo, hi, top if peak is None else max(float(peak), top)


def same_padding(size, window, stride):
    """TensorFlow's 'SAME' padding of one axis: (before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module("{}.{}".format(__name__, _module.name))
