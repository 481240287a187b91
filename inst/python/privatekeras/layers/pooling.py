"""Pooling: average and max pooling in 1-D and 2-D, global average pooling, and sum pooling
(an average pool whose 1/k the converter moved into the next Dense or convolution, saving the
pool's truncation round).

TF Encrypted pads 'SAME' pools with zeros and averages over the whole window, where Keras
ignores the padding. So an average pool is converted only when 'SAME' adds no padding (then it
is 'VALID'), and a max pool with padding only when its inputs cannot be negative (after a
ReLU, say: a zero then never wins over a real value); the range check verifies the latter.
"""

import numpy as np

from . import BoundError, Kind, interval, pair, register, same_padding, single
from ..mpc.tfe_compat import sum_pool_private


def _windows(v, pool, strides, padding, fill):
    """Windows of one (H, W, C) array: (H', W', C, ph, pw)."""
    if padding == "SAME":
        pads = [same_padding(v.shape[a], pool[a], strides[a]) for a in (0, 1)]
        v = np.pad(v, pads + [(0, 0)], constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(v, pool, axis=(0, 1))
    return win[::strides[0], ::strides[1]]


def _pool_params(ctx, cfg, rank):
    ctx.channels_last(cfg)
    if rank == 2:
        pool = pair(cfg.get("pool_size", 2))
        strides = pair(cfg["strides"]) if cfg.get("strides") else pool
        size = ctx.in_shapes[0][:2]
    else:  # 1-D pools are 2-D pools of height 1
        pool = (1, single(cfg.get("pool_size", 2)))
        strides = (1, single(cfg["strides"])) if cfg.get("strides") else pool
        size = (1, ctx.in_shapes[0][0])
    padding = cfg.get("padding", "valid").upper()
    if padding == "SAME" and all(same_padding(n, p, s) == (0, 0)
                                 for n, p, s in zip(size, pool, strides)):
        padding = "VALID"
    return {"pool_size": pool, "strides": strides, "padding": padding}


def _pool_1d(prot, x, pool2d):
    """Apply a 2-D NCHW pool to a (batch, steps, channels) tensor as height-1 images."""
    batch, steps, channels = (int(d) for d in x.shape)
    x = prot.reshape(prot.transpose(x, perm=[0, 2, 1]), [batch, channels, 1, steps])
    y = pool2d(x)
    y = prot.reshape(y, [batch, channels, int(y.shape[-1])])
    return prot.transpose(y, perm=[0, 2, 1])


def _as_image(node, lo, hi):
    """Bounds of a 1-D layer's input as height-1 images."""
    return (lo[None], hi[None]) if node["kind"].endswith("1d") else (lo, hi)


def _back(node, y):
    return y[0] if node["kind"].endswith("1d") else y


def sum_windows(v, pool, strides):
    """The sum of each VALID window of one (H, W, C) array: (H', W', C)."""
    return _windows(v, pool, strides, "VALID", 0).sum(axis=(-2, -1))


class _Pool(Kind):
    """A pool over 2-D images, or over steps (``rank = 1``) as images of height 1."""

    rank = 2
    homogeneous = True

    def convert(self, ctx, layer, cfg):
        return ctx.add(self.kind, params=_pool_params(ctx, cfg, self.rank))

    def pool2d(self, prot, x, *args):
        raise NotImplementedError

    def forward(self, prot, node, ws, x):
        p = node["params"]
        pool = lambda v: self.pool2d(prot, v, tuple(p["pool_size"]),  # noqa: E731
                                     tuple(p["strides"]), p["padding"])
        return _pool_1d(prot, x, pool) if self.rank == 1 else pool(x)


@register
class AveragePooling(_Pool):
    kind = "avgpool"
    keras = ("AveragePooling2D",)

    def convert(self, ctx, layer, cfg):
        params = _pool_params(ctx, cfg, self.rank)
        if params["padding"] != "VALID":
            raise ctx.unsupported("padding='same' that pads is not supported for average "
                                  "pooling (the private pool would average the padding)")
        return ctx.add(self.kind, params=params)

    def bounds(self, node, ws, x):
        p = node["params"]
        lo, hi = _as_image(node, *x)
        mean = [_windows(v, p["pool_size"], p["strides"], "VALID", 0).mean(axis=(-2, -1))
                for v in (lo, hi)]
        return interval(_back(node, mean[0]), _back(node, mean[1]))

    def pool2d(self, prot, x, *args):
        return prot.avgpool2d(x, *args)


@register
class AveragePooling1D(AveragePooling):
    kind = "avgpool1d"
    keras = ("AveragePooling1D",)
    rank = 1


@register
class SumPooling(_Pool):
    """The sum of each window: an average pool times its window size. Local to each worker
    (no multiplication, so no truncation)."""

    kind = "sumpool"
    keras = ()

    def bounds(self, node, ws, x):
        p = node["params"]
        lo, hi = _as_image(node, *x)
        total = [sum_windows(v, p["pool_size"], p["strides"]) for v in (lo, hi)]
        return interval(_back(node, total[0]), _back(node, total[1]))

    def pool2d(self, prot, x, pool_size, strides, padding):
        assert padding == "VALID", padding  # average pools that pad are refused
        return sum_pool_private(prot, x, pool_size, strides)


@register
class SumPooling1D(SumPooling):
    kind = "sumpool1d"
    rank = 1


@register
class MaxPooling(_Pool):
    kind = "maxpool"
    keras = ("MaxPooling2D",)

    def bounds(self, node, ws, x):
        lo, hi = x
        p = node["params"]
        if p["padding"] == "SAME" and lo.min(initial=0.0) < 0:
            raise BoundError("a max pool with padding='same' needs inputs that cannot be "
                             "negative (the private pool pads with zeros); its inputs reach "
                             "{:.4g}. Put a ReLU before it or use padding='valid'".format(
                                 lo.min()))
        lo, hi = _as_image(node, lo, hi)
        top = [_windows(v, p["pool_size"], p["strides"], p["padding"], 0).max(axis=(-2, -1))
               for v in (lo, hi)]
        return interval(_back(node, top[0]), _back(node, top[1]))

    def pool2d(self, prot, x, *args):
        return prot.maxpool2d(x, *args)


@register
class MaxPooling1D(MaxPooling):
    kind = "maxpool1d"
    keras = ("MaxPooling1D",)
    rank = 1


@register
class GlobalAveragePooling(Kind):
    """The mean over all steps (1-D) or all pixels (2-D) of each channel."""

    kind = "global_avgpool"
    keras = ("GlobalAveragePooling1D", "GlobalAveragePooling2D")

    def convert(self, ctx, layer, cfg):
        ctx.channels_last(cfg)
        return ctx.add(self.kind, params={"keepdims": bool(cfg.get("keepdims", False))})

    def bounds(self, node, ws, x):
        lo, hi = x
        axes = tuple(range(lo.ndim - 1))
        keep = node["params"]["keepdims"]
        return interval(lo.mean(axis=axes, keepdims=keep), hi.mean(axis=axes, keepdims=keep))

    def forward(self, prot, node, ws, x):
        batch = int(x.shape[0])
        axes = [2, 3] if len(x.shape) == 4 else [1]  # NCHW images, (batch, steps, ch)
        count = int(np.prod([int(x.shape[a]) for a in axes]))
        y = prot.reduce_sum(x, axis=axes) * (1.0 / count)
        if node["params"]["keepdims"]:
            channels = int(node["shape"][-1])
            y = prot.reshape(y, [batch, channels, 1, 1] if len(x.shape) == 4
                             else [batch, 1, channels])
        return y
