"""Activations, and the layers that are the identity at inference.

Inside the network: ReLU and leaky ReLU. As the model's final activation only: softmax and
sigmoid, which the client applies after reconstruction (``predict_proba``); the converter
splits them off the graph, so the workers never evaluate them.
"""

import numpy as np

from . import Kind, interval, register
from ..mpc.tfe_compat import relu

# Activation names (an ``activation=`` argument or an Activation layer) and their node kind;
# None is the identity.
_KINDS = {"linear": None, "relu": "relu", "leaky_relu": "leaky_relu", "softmax": "softmax",
          "sigmoid": "sigmoid"}
CLIENT_SIDE = ("softmax", "sigmoid")  # only as the final activation, applied by the client
DEFAULT_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu's default


def name_of(value):
    """The name of an activation given as None, a string or a function."""
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    return getattr(value, "__name__", str(value))


def activation(ctx, value, x):
    """Add the nodes of activation ``value`` applied to node ``x``; returns the output node."""
    name = name_of(value)
    if name not in _KINDS:
        raise ctx.unsupported(
            "activation {!r} is not supported (inside the network: relu, leaky_relu, linear; "
            "as the model's final activation also softmax and sigmoid)".format(name))
    kind = _KINDS[name]
    if kind is None:
        return x
    params = {"alpha": DEFAULT_LEAKY_SLOPE} if kind == "leaky_relu" else {}
    return ctx.add(kind, inputs=[x], params=params, name=ctx.layer.name + "/" + name)


@register
class Activation(Kind):
    keras = ("Activation",)
    supported = ("Activation (relu, leaky_relu, linear; final softmax or sigmoid)",)

    def convert(self, ctx, layer, cfg):
        return activation(ctx, cfg.get("activation"), ctx.inputs[0])


@register
class Identity(Kind):
    """Layers that do nothing at inference."""

    keras = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout",
             "GaussianNoise", "AlphaDropout", "ActivityRegularization")

    def convert(self, ctx, layer, cfg):
        return ctx.inputs[0]


@register
class ReLU(Kind):
    kind = "relu"
    homogeneous = True
    keras = ("ReLU",)
    supported = ("ReLU (default arguments, or negative_slope alone)",)

    def convert(self, ctx, layer, cfg):
        slope = float(cfg.get("negative_slope") or 0.0)
        if cfg.get("max_value") is not None or float(cfg.get("threshold") or 0.0) != 0:
            raise ctx.unsupported("only ReLU without max_value and threshold is supported")
        if slope:
            return LeakyReLU.node(ctx, slope)
        return ctx.add(self.kind)

    def bounds(self, node, ws, x):
        lo, hi = x
        return interval(np.maximum(lo, 0), np.maximum(hi, 0))

    def forward(self, prot, node, ws, x):
        return relu(prot, x)


@register
class LeakyReLU(Kind):
    """max(x, 0) + alpha * min(x, 0), evaluated as relu(x) + alpha * (x - relu(x)): one
    ReLU and one multiplication by a public constant."""

    kind = "leaky_relu"
    homogeneous = True
    keras = ("LeakyReLU",)

    @staticmethod
    def node(ctx, alpha):
        if not 0 <= alpha <= 1:
            raise ctx.unsupported("the negative slope must lie in [0, 1], got {}".format(alpha))
        return ctx.add("leaky_relu", params={"alpha": float(alpha)})

    def convert(self, ctx, layer, cfg):
        alpha = cfg.get("negative_slope", cfg.get("alpha", 0.3))
        return self.node(ctx, float(alpha))

    def bounds(self, node, ws, x):
        lo, hi = x
        a = node["params"]["alpha"]
        f = lambda v: np.where(v > 0, v, a * v)  # noqa: E731 - monotone for a >= 0
        return interval(f(lo), f(hi))

    def forward(self, prot, node, ws, x):
        r = relu(prot, x)
        return r + (x - r) * float(node["params"]["alpha"])


class _ClientSide(Kind):
    """A final activation: split off the graph by the converter, applied by the client."""

    def convert(self, ctx, layer, cfg):
        if int(cfg.get("axis", -1)) not in (-1, len(ctx.out_shape)):
            raise ctx.unsupported("only a softmax over the last axis is supported")
        return ctx.add(self.kind)

    def bounds(self, node, ws, *ins):  # never reached: only final activations exist
        raise AssertionError("client-side activation inside the private graph")

    forward = bounds

    @staticmethod
    def apply(values):
        """The activation in numpy, on the client."""
        raise NotImplementedError


@register
class Softmax(_ClientSide):
    kind = "softmax"
    keras = ("Softmax",)
    supported = ("Softmax (final)",)

    @staticmethod
    def apply(values):
        z = np.exp(values - values.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


@register
class Sigmoid(_ClientSide):
    kind = "sigmoid"
    keras = ()

    @staticmethod
    def apply(values):
        return np.exp(-np.logaddexp(0.0, -values))  # 1 / (1 + exp(-x)), without overflow


def apply_final(name, values):
    """Apply a served model's final activation (``None``: none) to reconstructed values."""
    values = np.asarray(values, dtype=np.float64)
    if name is None:
        return values
    if name not in CLIENT_SIDE:
        raise ValueError("unknown final activation {!r}: update privatekeras".format(name))
    return {"softmax": Softmax, "sigmoid": Sigmoid}[name].apply(values)
