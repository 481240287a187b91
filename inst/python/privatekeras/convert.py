"""Model conversion: a Keras model becomes a graph of plain nodes for private evaluation.

The graph is read from the Keras model itself (Sequential or functional, branches and joins,
nested models inlined), in topological order, each shared tensor converted once. Every Keras
layer is converted by its entry in the layer registry (:mod:`privatekeras.layers`). Then:

- a final softmax or sigmoid is split off: the workers compute the values before it and the
  client applies it (``predict_proba``);
- a per-channel affine map (BatchNormalization, Normalization, Rescaling) next to a Dense or
  convolution is folded into that layer's secret weights when this is exact;
- an average pool's 1/k moves into the next Dense or convolution when only ReLUs, max pools
  or reshapes lie between (the pool becomes a sum, with no truncation round).

:func:`check_range` bounds every value the private step computes from the declared input range
and refuses a model that could leave the fixed-point headroom.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from . import layers as registry
from .errors import OutOfRangeError, UnsupportedLayerError
from .layers.activations import CLIENT_SIDE, activation as _activation
from .mpc.encoding import FIXED64

INPUT = registry.INPUT


@dataclass
class Node:
    """One step of the private evaluation: a registry kind applied to earlier nodes' outputs
    (``inputs``: node ids, :data:`INPUT` for the model's input), with secret ``weights`` and
    public ``params``; ``shape`` is its output's shape without the batch dimension."""

    kind: str
    name: str
    inputs: List[int]
    params: dict = field(default_factory=dict)
    weights: List[np.ndarray] = field(default_factory=list)
    shape: Tuple[int, ...] = ()

    def public(self):
        """What the workers are told about this node (no weight, only weight shapes)."""
        return {"kind": self.kind, "name": self.name, "inputs": list(self.inputs),
                "params": _jsonable(self.params), "shape": [int(d) for d in self.shape],
                "weight_shapes": [list(w.shape) for w in self.weights]}


@dataclass
class ModelSpec:
    """A converted model: its nodes in evaluation order (the last one is the output), shapes
    without the batch dimension, and the final activation the client applies."""

    nodes: List[Node]
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    output_activation: Optional[str]  # None, "softmax" or "sigmoid"
    batch_size: Optional[int]  # the model's own fixed batch size, if any
    name: str = "model"

    @property
    def weights(self):
        """Every secret weight, in upload order."""
        return [w for node in self.nodes for w in node.weights]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def supported_layers():
    """The Keras layers :func:`convert` accepts, as described to users."""
    return registry.supported_layers()


def load_model(model_or_path):
    """Return a Keras model from a model object or a ``.keras``/``.h5`` path."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.exists(path):
            raise FileNotFoundError("no model file at {}".format(path))
        if not path.endswith((".keras", ".h5", ".hdf5")):
            raise ValueError(
                "{} is not a Keras model file: expected a .keras or .h5 file".format(path)
            )
        import keras

        try:
            return keras.models.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ValueError("could not load a Keras model from {}: {}".format(path, exc)) from exc
    if not hasattr(model_or_path, "layers") or not hasattr(model_or_path, "get_weights"):
        raise TypeError(
            "expected a Keras model or a path to a .keras/.h5 file, got {}".format(
                type(model_or_path).__name__)
        )
    return model_or_path


def _unsupported(layer, why=None):
    msg = "layer {!r} ({}) is not supported for private prediction".format(
        layer.name, type(layer).__name__)
    if why:
        msg += ": " + why
    msg += ". Supported layers: " + ", ".join(supported_layers())
    return UnsupportedLayerError(msg)


def _shape(tensor):
    return tuple(None if d is None else int(d) for d in tensor.shape)


class _Layer:
    """The converter's view of one Keras layer call, handed to its registry entry."""

    def __init__(self, graph, layer, inputs, in_shapes, out_shape):
        self.graph, self.layer = graph, layer
        self.inputs, self.in_shapes, self.out_shape = inputs, in_shapes, out_shape
        self._weights = None

    @property
    def weights(self):
        """The layer's weights as float64 arrays."""
        if self._weights is None:
            self._weights = [np.asarray(w, dtype=np.float64) for w in self.layer.get_weights()]
        return self._weights

    def add(self, kind, inputs=None, params=None, weights=(), name=None):
        """Append a node of ``kind`` (default input: the layer's inputs; default shape: the
        layer's output shape) and return its id."""
        self.graph.append(Node(kind, name or self.layer.name,
                               list(self.inputs if inputs is None else inputs),
                               dict(params or {}), list(weights), tuple(self.out_shape)))
        return len(self.graph) - 1

    def activation(self, value, x):
        """Add activation ``value`` (name or function) applied to node ``x``."""
        return _activation(self, value, x)

    def unsupported(self, why=None):
        """The error refusing this layer, saying why."""
        return _unsupported(self.layer, why)

    def channels_last(self, cfg):
        """Refuse channels-first layers."""
        if cfg.get("data_format") not in (None, "channels_last"):
            raise self.unsupported("only data_format='channels_last' is supported")


def _is_model(op):
    return hasattr(op, "layers") and hasattr(op, "inputs") and hasattr(op, "outputs")


class _Tracer:
    """Walks a Keras graph from its output back to its input, converting each layer call once
    and after its inputs (so the nodes come out in topological order)."""

    def __init__(self):
        self.nodes = []

    def value(self, tensor, env):
        """The node id holding ``tensor``; ``env`` maps id(tensor) -> node id for the tensors
        already converted in this (sub)model, starting with its inputs."""
        key = id(tensor)
        if key in env:
            return env[key]
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            raise ValueError("the model's graph cannot be read: a tensor has no Keras history")
        op, node_index, tensor_index = history
        call = op._inbound_nodes[node_index]
        ins = [self.value(t, env) for t in call.input_tensors]
        if _is_model(op):  # a nested model: inline its graph
            if len(op.inputs) != len(ins):
                raise _unsupported(op, "a nested model with several inputs")
            inner = {id(t): i for t, i in zip(op.inputs, ins)}
            env[key] = self.value(op.outputs[tensor_index], inner)
            return env[key]
        if type(op).__name__ == "InputLayer":
            raise _unsupported(op, "a second model input (only one input is supported)")
        if len(call.output_tensors) != 1:
            raise _unsupported(op, "a layer with several outputs")
        entry = registry.by_keras(type(op).__name__)
        if entry is None:
            raise _unsupported(op)
        ctx = _Layer(self.nodes, op, ins, [_shape(t)[1:] for t in call.input_tensors],
                     _shape(tensor)[1:])
        env[key] = entry.convert(ctx, op, op.get_config())
        return env[key]


def _model_input(model):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError("the model has no known input shape: build it (or give it a "
                         "keras.Input) before sharing it")
    if len(inputs) != 1:
        raise UnsupportedLayerError("the model has {} inputs; only models with one input are "
                                    "supported".format(len(inputs)))
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        raise UnsupportedLayerError("the model has {} outputs; only models with one output are "
                                    "supported".format(len(outputs)))
    shape = _shape(inputs[0])
    if len(shape) < 2 or any(d is None for d in shape[1:]):
        raise ValueError("the model's input shape {} must be fully known apart from the batch "
                         "dimension".format(shape))
    return inputs[0], outputs[0], shape


def _consumers(nodes):
    out = {i: [] for i in range(len(nodes))}
    for j, node in enumerate(nodes):
        for i in node.inputs:
            if i != INPUT:
                out[i].append(j)
    return out


def _keep(nodes, output):
    """The nodes ``output`` depends on, renumbered in order; returns (nodes, new output id)."""
    needed, stack = set(), [output]
    while stack:
        i = stack.pop()
        if i != INPUT and i not in needed:
            needed.add(i)
            stack.extend(nodes[i].inputs)
    order = sorted(needed)
    new = {old: k for k, old in enumerate(order)}
    new[INPUT] = INPUT
    kept = []
    for old in order:
        node = nodes[old]
        node.inputs = [new[i] for i in node.inputs]
        kept.append(node)
    return kept, new[output]


def _split_final_activation(nodes, output):
    activation = None
    if nodes[output].kind in CLIENT_SIDE:
        activation = nodes[output].kind
        output = nodes[output].inputs[0]
    nodes, output = _keep(nodes, output)
    for node in nodes:
        if node.kind in CLIENT_SIDE:
            raise UnsupportedLayerError(
                "{!r}: a {} is supported only as the model's final activation (the client "
                "applies it); inside the network use relu or leaky_relu".format(
                    node.name, node.kind))
    return nodes, output, activation


def _redirect(nodes, old, new):
    for node in nodes:
        node.inputs = [new if i == old else i for i in node.inputs]


def _fold_affine(nodes, output):
    """Fold affine nodes into an adjacent Dense/convolution where that is exact."""
    changed = True
    while changed:
        changed = False
        users = _consumers(nodes)
        for a, node in enumerate(nodes):
            if node.kind != "affine" or not node.weights:
                continue
            scale, offset = node.weights
            src = node.inputs[0]
            # after: a linear node whose only user is this map
            if src != INPUT and registry.by_kind(nodes[src].kind).linear \
                    and users[src] == [a]:
                lin = nodes[src]
                kernel, bias = lin.weights
                lin.weights = [kernel * scale, bias * scale + offset]
                lin.name, lin.shape = lin.name + "+" + node.name, node.shape
                _redirect(nodes, a, src)
                output = src if output == a else output
                node.weights, node.inputs = [], []  # dropped by _keep
                changed = True
                break
            # before: this map's only user is a Dense, or a convolution that adds no padding
            if len(users[a]) == 1 and a != output:
                lin = nodes[users[a][0]]
                if registry.by_kind(lin.kind).linear and lin.inputs == [a] and \
                        lin.params.get("padding", "VALID") == "VALID":
                    kernel, bias = lin.weights
                    per_in = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum(axis=0)
                    lin.weights = [kernel * scale[:, None], bias + offset @ per_in]
                    lin.name, lin.inputs = node.name + "+" + lin.name, list(node.inputs)
                    node.weights, node.inputs = [], []
                    changed = True
                    break
        if changed:
            nodes, output = _keep(nodes, output)
    return nodes, output


_SUMS = {"avgpool": "sumpool", "avgpool1d": "sumpool1d"}


def _defer_averages(nodes, output):
    """Make an average pool a sum pool and move its 1/k into the next Dense or convolution,
    when every node in between passes a positive scale through unchanged (ReLU, max pool,
    reshape, ...) and is read by nothing else: the pool then needs no truncation round."""
    users = _consumers(nodes)
    for i, node in enumerate(nodes):
        if node.kind not in _SUMS:
            continue
        cur, target = i, None
        while cur != output and len(users[cur]) == 1:
            nxt = users[cur][0]
            entry = registry.by_kind(nodes[nxt].kind)
            if nodes[nxt].inputs != [cur] or not (entry.linear or entry.homogeneous):
                break
            if entry.linear:
                target = nodes[nxt]
                break
            cur = nxt
        if target is not None:
            node.kind = _SUMS[node.kind]
            kernel, bias = target.weights
            target.weights = [kernel / float(np.prod(node.params["pool_size"])), bias]
    return nodes


def _pool_into_convolutions(nodes, output, input_shape):
    """Fold a 2-D sum pool into the convolution that is its input and has no other reader.
    The pool is linear, so ``sum_pool(conv(x, k))`` is one convolution of ``x`` with the sum
    of the pool window's shifted copies of ``k`` (a 3x3 kernel under a 2x2 pool: a 4x4 kernel
    at stride 2), on the input padded as the convolution padded it: a quarter as many output
    positions, each 16 products instead of 36, and the re-sharing and truncation that follow a
    product run on the pooled values only. The bias is added once per window element, so it
    is multiplied by the window size. (An overlapping pool, stride below window, costs more
    products this way than the two layers; such pools are rare.)"""
    users = _consumers(nodes)
    for p, node in enumerate(nodes):
        src = node.inputs[0] if node.inputs else INPUT
        if node.kind != "sumpool" or node.params["padding"] != "VALID" or src == INPUT:
            continue
        conv = nodes[src]
        if conv.kind != "conv2d" or users[src] != [p] or "pad" in conv.params:
            continue
        kernel, bias = conv.weights
        (kh, kw, c, f), (ph, pw) = kernel.shape, node.params["pool_size"]
        (sh, sw), (qh, qw) = conv.params["strides"], node.params["strides"]
        folded = np.zeros((kh + sh * (ph - 1), kw + sw * (pw - 1), c, f))
        for dy in range(ph):
            for dx in range(pw):
                folded[sh * dy:sh * dy + kh, sw * dx:sw * dx + kw] += kernel
        size = input_shape[:2] if conv.inputs == [INPUT] else nodes[conv.inputs[0]].shape[:2]
        pad = [list(registry.same_padding(n, k, st)) if conv.params["padding"] == "SAME" else [0, 0]
               for n, k, st in zip(size, (kh, kw), (sh, sw))]
        conv.weights = [folded, bias * float(ph * pw)]
        conv.params = dict(conv.params, strides=(sh * qh, sw * qw), padding="VALID", pad=pad)
        conv.name, conv.shape = conv.name + "+" + node.name, node.shape
        _redirect(nodes, p, src)
        output = src if output == p else output
        node.inputs = []  # dropped by _keep
    return _keep(nodes, output)


def convert(model_or_path) -> ModelSpec:
    """Convert a Keras model (or model file) into a :class:`ModelSpec`.

    Raises:
        UnsupportedLayerError: a layer (named in the message) cannot be evaluated privately.
    """
    model = load_model(model_or_path)
    inp, out, input_shape = _model_input(model)
    tracer = _Tracer()
    output = tracer.value(out, {id(inp): INPUT})
    nodes = tracer.nodes
    if output == INPUT:
        raise UnsupportedLayerError("the model computes nothing (its output is its input)")
    nodes, output, activation = _split_final_activation(nodes, output)
    if output == INPUT:
        raise UnsupportedLayerError("the model is only its final activation")
    nodes, output = _fold_affine(nodes, output)
    assert output == len(nodes) - 1
    nodes = _defer_averages(nodes, output)
    nodes, output = _pool_into_convolutions(nodes, output, input_shape[1:])
    assert output == len(nodes) - 1
    batch_size = input_shape[0]
    if batch_size is None:  # batch_input_shape= given through KerasHook
        batch_size = next((getattr(layer, "_privatekeras_batch_size") for layer in model.layers
                           if getattr(layer, "_privatekeras_batch_size", None)), None)
    return ModelSpec(nodes=nodes, input_shape=tuple(input_shape[1:]),
                     output_shape=tuple(nodes[-1].shape), output_activation=activation,
                     batch_size=batch_size, name=getattr(model, "name", "model"))


# -- range ---------------------------------------------------------------------------------
def check_input_range(input_range, bound=FIXED64.bound):
    """Validate a declared input range; returns (lo, hi) floats or None. ``bound``: the
    magnitude the range must stay below (None: any finite range)."""
    if input_range is None:
        return None
    if isinstance(input_range, (str, bytes)):
        raise ValueError("input_range must be two numbers (lo, hi), got {!r}".format(
            input_range))
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError("input_range must be two numbers (lo, hi), got {!r}".format(
            input_range)) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError("input_range must be two finite numbers with lo < hi, got {!r}".format(
            input_range))
    if bound is not None and (lo <= -bound or hi >= bound):
        raise ValueError("input_range must lie within (-{0:g}, {0:g}), the fixed-point "
                         "encoding's range; got ({1:g}, {2:g})".format(bound, lo, hi))
    return lo, hi


def check_range(spec, input_range=None):
    """Bound every value of the private evaluation, by interval arithmetic from the input
    range (default: the encoding's whole range) and the weights, and refuse a model that could
    leave the fixed-point headroom (:attr:`FixedPoint.headroom`).

    Returns:
        the largest magnitude any value can reach.
    Raises:
        OutOfRangeError: naming the first layer that can exceed the headroom and its bound.
    """
    declared = check_input_range(input_range)
    lo, hi = declared or (-FIXED64.bound, FIXED64.bound)
    # Batches are padded with zero rows, so zero is always a possible input.
    shape = spec.input_shape
    x = (np.full(shape, min(lo, 0.0)), np.full(shape, max(hi, 0.0)))
    values, top, limit = [], 0.0, FIXED64.headroom
    for node in spec.nodes:
        ins = [x if i == INPUT else values[i][:2] for i in node.inputs]
        try:
            out = registry.by_kind(node.kind).bounds(node.public(), node.weights, *ins)
        except registry.BoundError as exc:
            raise OutOfRangeError("layer {!r}: {}".format(node.name, exc)) from None
        if out[2] >= limit:
            given = ("the declared input range ({:g}, {:g})".format(lo, hi) if declared else
                     "inputs anywhere in the encoding's range (-{0:g}, {0:g}), as no input_range "
                     "was declared".format(FIXED64.bound))
            raise OutOfRangeError(
                "layer {!r} ({}) can reach values of magnitude {:.3g} for {}, beyond the "
                "fixed-point headroom of {:.3g} (2^{}): its private result would be wrong. "
                "{}".format(node.name, node.kind, out[2], given, limit,
                            int(np.log2(limit)),
                            "Declare the range your inputs really take, e.g. "
                            "input_range=(0, 1)" if not declared else
                            "Rescale the inputs or the weights (e.g. normalise the inputs)"))
        values.append(out)
        top = max(top, out[2])
    return top


__all__ = ["ModelSpec", "Node", "INPUT", "convert", "check_range", "check_input_range",
           "load_model", "supported_layers"]
