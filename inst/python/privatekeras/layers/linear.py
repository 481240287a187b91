"""Linear layers with secret weights: Dense, Conv2D, Conv1D (kernel and bias, then the
layer's activation as a node of its own)."""

import numpy as np

from . import (Kind, interval, keras_layout, pair, private_layout, register, same_padding,
               single)
from ..mpc.tfe_compat import add_bias, pad_private


def _kernel_and_bias(ctx, cfg):
    kernel = ctx.weights[0]
    bias = ctx.weights[1] if cfg.get("use_bias", True) else np.zeros(kernel.shape[-1])
    return [kernel, bias]


def _linear_bounds(apply, ws, lo, hi):
    """Interval of ``apply(x, kernel)`` + bias for x in [lo, hi]: positive kernel entries
    take their input's bound of the same side, negative ones the other."""
    kernel, bias = ws
    pos, neg = np.maximum(kernel, 0), np.minimum(kernel, 0)
    out_lo = apply(lo, pos) + apply(hi, neg)
    out_hi = apply(hi, pos) + apply(lo, neg)
    peak = max(np.abs(out_lo).max(initial=0.0), np.abs(out_hi).max(initial=0.0))
    return interval(out_lo + bias, out_hi + bias, peak)


def conv2d_numpy(x, kernel, strides, padding):
    """Plain convolution of one image ``x`` (H, W, C) in float64, as tf.nn.conv2d."""
    kh, kw = kernel.shape[:2]
    if padding == "SAME":
        (t, b), (left, r) = same_padding(x.shape[0], kh, strides[0]), \
            same_padding(x.shape[1], kw, strides[1])
        x = np.pad(x, ((t, b), (left, r), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
    win = win[::strides[0], ::strides[1]]  # (H', W', C, kh, kw)
    return np.einsum("hwcij,ijco->hwo", win, kernel, optimize=True)


@register
class Dense(Kind):
    kind = "dense"
    keras = ("Dense",)
    linear = True

    def convert(self, ctx, layer, cfg):
        x = ctx.add(self.kind, weights=_kernel_and_bias(ctx, cfg))
        return ctx.activation(cfg.get("activation"), x)

    def bounds(self, node, ws, x):
        lo, hi = x
        return _linear_bounds(lambda v, k: v @ k, ws, lo, hi)

    def forward(self, prot, node, ws, x):
        batch, shape = int(x.shape[0]), list(node["shape"])
        if len(x.shape) == 2:
            return add_bias(prot, prot.matmul(x, ws[0]), ws[1])
        x = prot.reshape(keras_layout(prot, x), [-1, int(ws[0].shape[0])])
        y = add_bias(prot, prot.matmul(x, ws[0]), ws[1])
        return private_layout(prot, prot.reshape(y, [batch] + shape))


def _conv_node(entry, ctx, cfg, rank):
    """The node of a Conv1D/Conv2D layer (``rank``), then its activation."""
    ctx.channels_last(cfg)
    size = pair if rank == 2 else single
    if size(cfg.get("dilation_rate", 1)) != size(1):
        raise ctx.unsupported("dilation_rate must be 1")
    if int(cfg.get("groups", 1)) != 1:
        raise ctx.unsupported("grouped convolutions are not supported")
    x = ctx.add(entry.kind, params={"strides": size(cfg.get("strides", 1)),
                                    "padding": cfg.get("padding", "valid").upper()},
                weights=_kernel_and_bias(ctx, cfg))
    return ctx.activation(cfg.get("activation"), x)


@register
class Conv2D(Kind):
    kind = "conv2d"
    keras = ("Conv2D",)
    linear = True

    def convert(self, ctx, layer, cfg):
        return _conv_node(self, ctx, cfg, 2)

    # params["pad"] ([[top, bottom], [left, right]]): explicit padding, with "padding"
    # VALID: a sum pool the converter folded into the kernel (see convert.py).

    def bounds(self, node, ws, x):
        lo, hi = x
        p = node["params"]
        pad = p.get("pad")

        def apply(v, kernel):
            if pad:
                v = np.pad(v, (tuple(pad[0]), tuple(pad[1]), (0, 0)))
            return conv2d_numpy(v, kernel, p["strides"], p["padding"])

        return _linear_bounds(apply, ws, lo, hi)

    def forward(self, prot, node, ws, x):
        p = node["params"]
        strides, padding = tuple(p["strides"]), p["padding"]
        pad = p.get("pad")
        if pad:  # as SAME when SAME pads just so (no op), else padded shares and VALID
            size, window = [int(d) for d in x.shape[2:]], [int(d) for d in ws[0].shape[:2]]
            if all(list(same_padding(n, k, st)) == list(b)
                   for n, k, st, b in zip(size, window, strides, pad)):
                padding = "SAME"
            elif any(any(b) for b in pad):
                x = pad_private(prot, x, [[0, 0], [0, 0]] + [list(b) for b in pad])
        y = prot.conv2d(x, ws[0], strides, padding)
        return add_bias(prot, y, prot.reshape(ws[1], [-1, 1, 1]))  # NCHW


@register
class Conv1D(Kind):
    """A convolution over steps (batch, steps, channels): evaluated as a 2-D convolution of
    height 1. ``padding='causal'`` pads the start of the sequence with zeros."""

    kind = "conv1d"
    keras = ("Conv1D",)
    linear = True

    def convert(self, ctx, layer, cfg):
        return _conv_node(self, ctx, cfg, 1)

    @staticmethod
    def _as_2d(params, width):
        """(left padding, 2-D padding name) of the equivalent height-1 convolution."""
        if params["padding"] == "CAUSAL":
            return width - 1, "VALID"
        return 0, params["padding"]

    def bounds(self, node, ws, x):
        lo, hi = x
        p = node["params"]
        k = ws[0].shape[0]
        left, padding = self._as_2d(p, k)

        def apply(v, kernel):
            v = np.pad(v, ((left, 0), (0, 0)))[None]
            return conv2d_numpy(v, kernel[None], (1, p["strides"]), padding)[0]

        return _linear_bounds(apply, ws, lo, hi)

    def forward(self, prot, node, ws, x):
        p = node["params"]
        batch, steps, channels = (int(d) for d in x.shape)
        k = int(ws[0].shape[0])
        left, padding = self._as_2d(p, k)
        x = prot.reshape(prot.transpose(x, perm=[0, 2, 1]), [batch, channels, 1, steps])
        if left:
            x = prot.pad(x, [[0, 0], [0, 0], [0, 0], [left, 0]])
        kernel = prot.reshape(ws[0], [1] + [int(d) for d in ws[0].shape])
        y = prot.conv2d(x, kernel, (1, p["strides"]), padding)  # (batch, out, 1, steps')
        y = add_bias(prot, y, prot.reshape(ws[1], [-1, 1, 1]))
        out_steps, out_channels = (int(d) for d in node["shape"])
        y = prot.reshape(y, [batch, out_channels, out_steps])
        return prot.transpose(y, perm=[0, 2, 1])
