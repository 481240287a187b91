"""Per-channel affine maps with secret parameters: BatchNormalization, Normalization,
Rescaling. Each becomes ``x * scale + offset`` over the last (channel) axis; the converter
folds it into an adjacent Dense or convolution when it can (then it costs nothing), otherwise
the workers evaluate it as a private multiplication. Either way its parameters are part of the
owner's secret model, never published.
"""

import numpy as np

from . import Kind, interval, register


def _last_axis_only(ctx, axis):
    rank = len(ctx.in_shapes[0])
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    axes = [int(a) for a in axes]
    if len(axes) != 1 or axes[0] not in (-1, rank):
        raise ctx.unsupported("only normalisation over the last (channel) axis is supported")


def _channels(ctx, values):
    """A per-channel vector from a scalar or an array that broadcasts over the channels."""
    channels = int(ctx.in_shapes[0][-1])
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 1:
        values = np.full(channels, float(values[0]))
    if values.size != channels:
        raise ctx.unsupported("expected one value per channel ({}), got {}".format(
            channels, values.size))
    return values


@register
class Affine(Kind):
    kind = "affine"
    keras = ("BatchNormalization", "Normalization", "Rescaling")

    def convert(self, ctx, layer, cfg):
        cls = type(layer).__name__
        if cls == "Rescaling":
            scale = _channels(ctx, cfg.get("scale", 1.0))
            offset = _channels(ctx, cfg.get("offset", 0.0))
        elif cls == "Normalization":
            _last_axis_only(ctx, cfg.get("axis", -1))
            if cfg.get("invert"):
                raise ctx.unsupported("Normalization(invert=True) is not supported")
            if getattr(layer, "mean", None) is None:
                raise ctx.unsupported("the layer was never adapted (call adapt() or give "
                                      "mean and variance)")
            mean = _channels(ctx, np.asarray(layer.mean))
            std = np.sqrt(_channels(ctx, np.asarray(layer.variance)))
            scale = 1.0 / np.maximum(std, 1e-7)  # Keras divides by max(sqrt(var), epsilon)
            offset = -mean * scale
        else:  # BatchNormalization at inference
            _last_axis_only(ctx, cfg.get("axis", -1))
            it = iter(ctx.weights)
            gamma = next(it) if cfg.get("scale", True) else None
            beta = next(it) if cfg.get("center", True) else None
            mean, var = next(it), next(it)
            gamma = np.ones_like(mean) if gamma is None else gamma
            beta = np.zeros_like(mean) if beta is None else beta
            scale = gamma / np.sqrt(var + float(cfg.get("epsilon", 1e-3)))
            offset = beta - mean * scale
        return ctx.add(self.kind, weights=[scale, offset])

    def bounds(self, node, ws, x):
        lo, hi = x
        scale, offset = ws
        a, b = lo * scale, hi * scale
        return interval(np.minimum(a, b) + offset, np.maximum(a, b) + offset,
                        max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0)))

    def forward(self, prot, node, ws, x):
        scale, offset = ws
        if len(x.shape) == 4:  # NCHW: channels on axis 1
            scale, offset = (prot.reshape(w, [-1, 1, 1]) for w in (scale, offset))
        return x * scale + offset
