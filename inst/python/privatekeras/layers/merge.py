"""Layers that join branches: Add and Concatenate."""

import functools

import numpy as np

from . import Kind, interval, register


@register
class Add(Kind):
    kind = "add"
    keras = ("Add",)

    def convert(self, ctx, layer, cfg):
        shapes = {tuple(s) for s in ctx.in_shapes}
        if len(shapes) != 1:
            raise ctx.unsupported("inputs of different shapes {} (broadcasting is not "
                                  "supported)".format(sorted(shapes)))
        return ctx.add(self.kind)

    def bounds(self, node, ws, *ins):
        return interval(sum(lo for lo, _ in ins), sum(hi for _, hi in ins))

    def forward(self, prot, node, ws, *xs):
        return functools.reduce(prot.add, xs)


@register
class Concatenate(Kind):
    kind = "concat"
    keras = ("Concatenate",)

    def convert(self, ctx, layer, cfg):
        rank = len(ctx.out_shape)  # without the batch dimension
        axis = int(cfg.get("axis", -1))
        axis = axis + rank + 1 if axis < 0 else axis
        if not 1 <= axis <= rank:
            raise ctx.unsupported("cannot concatenate along the batch axis")
        return ctx.add(self.kind, params={"axis": axis})

    def bounds(self, node, ws, *ins):
        axis = node["params"]["axis"] - 1  # bounds have no batch axis
        return interval(np.concatenate([lo for lo, _ in ins], axis=axis),
                        np.concatenate([hi for _, hi in ins], axis=axis))

    def forward(self, prot, node, ws, *xs):
        axis = node["params"]["axis"]
        if len(xs[0].shape) == 4:  # NHWC axis -> NCHW axis
            axis = {1: 2, 2: 3, 3: 1}[axis]
        return prot.concat(list(xs), axis)
