"""Layers that only move values: Flatten, Reshape, ZeroPadding2D."""

import numpy as np

from . import Kind, interval, keras_layout, pair, private_layout, register


@register
class Reshape(Kind):
    """Flatten and Reshape: a reshape of the Keras-layout tensor to the node's shape."""

    kind = "reshape"
    keras = ("Flatten", "Reshape")
    homogeneous = True

    def convert(self, ctx, layer, cfg):
        if type(layer).__name__ == "Flatten":
            ctx.channels_last(cfg)
        return ctx.add(self.kind)

    def bounds(self, node, ws, x):
        lo, hi = x
        shape = tuple(node["shape"])
        return interval(lo.reshape(shape), hi.reshape(shape))

    def forward(self, prot, node, ws, x):
        batch = int(x.shape[0])
        y = prot.reshape(keras_layout(prot, x), [batch] + [int(d) for d in node["shape"]])
        return private_layout(prot, y)


def _pads(value):
    """ZeroPadding2D's padding as ((top, bottom), (left, right))."""
    if isinstance(value, int):
        return ((value, value), (value, value))
    rows, cols = value
    return (pair(rows), pair(cols))


@register
class ZeroPadding2D(Kind):
    kind = "zero_pad2d"
    keras = ("ZeroPadding2D",)
    homogeneous = True

    def convert(self, ctx, layer, cfg):
        ctx.channels_last(cfg)
        return ctx.add(self.kind, params={"padding": _pads(cfg.get("padding", 1))})

    def bounds(self, node, ws, x):
        lo, hi = x
        (t, b), (left, r) = node["params"]["padding"]
        pads = ((t, b), (left, r), (0, 0))
        return interval(np.pad(lo, pads), np.pad(hi, pads))

    def forward(self, prot, node, ws, x):
        (t, b), (left, r) = node["params"]["padding"]
        return prot.pad(x, [[0, 0], [0, 0], [t, b], [left, r]])  # NCHW
