"""Model conversion: a Keras model becomes a list of plain layer specs for private evaluation.

Works from each layer's class name, config and weights, so it accepts Keras 3 and Keras 2
models alike (R's keras/keras3 models are the same Python objects). BatchNormalization is
folded into the Conv2D/Dense before it; a final softmax is split off and applied by the
client after reconstruction; Dropout is the identity at inference.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .errors import UnsupportedLayerError

SUPPORTED_LAYERS = (
    "InputLayer", "Conv2D", "Dense", "AveragePooling2D", "MaxPooling2D", "ReLU",
    "Activation('relu'|'linear'|final 'softmax')", "Flatten", "Reshape",
    "BatchNormalization (after Conv2D/Dense)", "Dropout", "final Softmax",
)


@dataclass
class LayerSpec:
    """One step of the private forward pass.

    kind: conv2d | dense | relu | avgpool | maxpool | flatten | reshape.
    """

    kind: str
    name: str
    params: dict = field(default_factory=dict)
    weights: List[np.ndarray] = field(default_factory=list)


@dataclass
class ModelSpec:
    """A converted model: its layers, shapes (batch dimension excluded) and output activation."""

    layers: List[LayerSpec]
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    output_activation: Optional[str]  # None or "softmax", applied by the client
    batch_size: Optional[int]  # the model's own fixed batch size, if any
    name: str = "model"


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
    msg += ". Supported layers: " + ", ".join(SUPPORTED_LAYERS)
    return UnsupportedLayerError(msg)


def _activation_name(value):
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    return getattr(value, "__name__", str(value))


def _pair(value):
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def _check_channels_last(layer, cfg):
    if cfg.get("data_format") not in (None, "channels_last"):
        raise _unsupported(layer, "only data_format='channels_last' is supported")


def _input_shape(model):
    shape = None
    try:
        shape = tuple(model.inputs[0].shape)
    except (AttributeError, IndexError, ValueError, TypeError):
        pass
    if shape is None:
        shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    if shape is None:
        raise ValueError("the model has no known input shape: build it (or give the first layer "
                         "an input shape) before sharing it")
    return tuple(None if d is None else int(d) for d in shape)


def _check_chain(model):
    """Reject functional models that are not a simple chain of single-input layers."""
    layers = model.layers
    for layer in layers:
        nodes = getattr(layer, "_inbound_nodes", None) or []
        for node in nodes:
            parents = getattr(node, "parent_nodes", None)
            if parents is not None and len(parents) > 1:
                raise _unsupported(layer, "only sequential chains of layers are supported "
                                   "(this layer has several inputs)")


def convert(model_or_path) -> ModelSpec:
    """Convert a Keras model (or model file) into a :class:`ModelSpec`."""
    model = load_model(model_or_path)
    _check_chain(model)
    input_shape = _input_shape(model)
    if len(input_shape) < 2 or any(d is None for d in input_shape[1:]):
        raise ValueError("the model's input shape {} must be fully known apart from the batch "
                         "dimension".format(input_shape))

    layers: List[LayerSpec] = []
    output_activation = None

    def add_activation(layer, act, is_last):
        nonlocal output_activation
        if act in ("linear", None):
            return
        if act == "relu":
            layers.append(LayerSpec("relu", layer.name + "/relu"))
        elif act == "softmax" and is_last:
            output_activation = "softmax"
        else:
            raise _unsupported(layer, "activation {!r} is not supported (only relu, linear, "
                               "and softmax as the final activation)".format(act))

    model_layers = [lyr for lyr in model.layers if type(lyr).__name__ != "InputLayer"]
    for idx, layer in enumerate(model_layers):
        cls = type(layer).__name__
        cfg = layer.get_config()
        is_last = idx == len(model_layers) - 1
        weights = [np.asarray(w, dtype=np.float64) for w in layer.get_weights()]
        if cls == "Conv2D":
            _check_channels_last(layer, cfg)
            if _pair(cfg.get("dilation_rate", 1)) != (1, 1):
                raise _unsupported(layer, "dilation_rate must be 1")
            if int(cfg.get("groups", 1)) != 1:
                raise _unsupported(layer, "grouped convolutions are not supported")
            kernel = weights[0]
            bias = weights[1] if cfg.get("use_bias", True) else np.zeros(kernel.shape[-1])
            layers.append(LayerSpec("conv2d", layer.name, {
                "strides": _pair(cfg.get("strides", 1)),
                "padding": cfg.get("padding", "valid").upper(),
            }, [kernel, bias]))
            add_activation(layer, _activation_name(cfg.get("activation")), is_last)
        elif cls == "Dense":
            kernel = weights[0]
            bias = weights[1] if cfg.get("use_bias", True) else np.zeros(kernel.shape[-1])
            layers.append(LayerSpec("dense", layer.name, {}, [kernel, bias]))
            add_activation(layer, _activation_name(cfg.get("activation")), is_last)
        elif cls in ("AveragePooling2D", "MaxPooling2D"):
            _check_channels_last(layer, cfg)
            pool = _pair(cfg.get("pool_size", 2))
            strides = cfg.get("strides")
            layers.append(LayerSpec("avgpool" if cls.startswith("Average") else "maxpool",
                                    layer.name, {
                                        "pool_size": pool,
                                        "strides": _pair(strides) if strides else pool,
                                        "padding": cfg.get("padding", "valid").upper(),
                                    }))
        elif cls == "ReLU":
            if cfg.get("max_value") is not None or float(cfg.get("negative_slope", 0) or 0) != 0 \
                    or float(cfg.get("threshold", 0) or 0) != 0:
                raise _unsupported(layer, "only the plain ReLU (no max_value, negative_slope or "
                                   "threshold) is supported")
            layers.append(LayerSpec("relu", layer.name))
        elif cls == "Activation":
            add_activation(layer, _activation_name(cfg.get("activation")), is_last)
        elif cls == "Softmax" and is_last:
            output_activation = "softmax"
        elif cls == "Flatten":
            _check_channels_last(layer, cfg)
            layers.append(LayerSpec("flatten", layer.name))
        elif cls == "Reshape":
            layers.append(LayerSpec("reshape", layer.name,
                                    {"target_shape": tuple(int(d) for d in cfg["target_shape"])}))
        elif cls == "Dropout":
            continue
        elif cls == "BatchNormalization":
            _fold_batchnorm(layer, cfg, weights, layers)
        else:
            raise _unsupported(layer)

    output_shape = tuple(int(d) for d in model.outputs[0].shape[1:]) \
        if getattr(model, "outputs", None) else None
    batch_size = input_shape[0]
    if batch_size is None and model_layers:  # batch_input_shape= given through KerasHook
        batch_size = getattr(model_layers[0], "_privatekeras_batch_size", None)
    return ModelSpec(layers=layers, input_shape=tuple(input_shape[1:]),
                     output_shape=output_shape, output_activation=output_activation,
                     batch_size=batch_size, name=getattr(model, "name", "model"))


def _fold_batchnorm(layer, cfg, weights, layers):
    """Fold y = gamma * (x - mean) / sqrt(var + eps) + beta into the preceding layer."""
    axis = cfg.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    if axis not in (-1, 3, 1) or (axis == 1 and layers and layers[-1].kind == "conv2d"):
        raise _unsupported(layer, "only BatchNormalization over the last (channel) axis is "
                           "supported")
    if not layers or layers[-1].kind not in ("conv2d", "dense"):
        raise _unsupported(layer, "BatchNormalization is folded into the layer before it, which "
                           "must be a Conv2D or Dense without activation")
    prev = layers[-1]
    it = iter(weights)
    gamma = next(it) if cfg.get("scale", True) else None
    beta = next(it) if cfg.get("center", True) else None
    mean = next(it)
    var = next(it)
    gamma = np.ones_like(mean) if gamma is None else gamma
    beta = np.zeros_like(mean) if beta is None else beta
    factor = gamma / np.sqrt(var + float(cfg.get("epsilon", 1e-3)))
    kernel, bias = prev.weights
    prev.weights = [kernel * factor, (bias - mean) * factor + beta]
    prev.name = prev.name + "+" + layer.name
