"""What the CKKS backend serves: an affine map and an inverse link.

A :class:`LinearModel` is ``eta = x W + b`` (``W`` of shape ``(d, k)``), evaluated by the server
on encrypted rows, and the name of the function the client applies to ``eta`` after
decryption (the inverse link of a GLM, or a Keras model's final activation). Three sources:

* :func:`from_keras`: Keras models made only of Dense, Dropout (and the other layers that are
  the identity at inference) and Normalization/Rescaling/BatchNormalization layers, without
  a hidden nonlinearity: composed here, in clear, into one affine map (linear, logistic,
  softmax regression);
* R ``lm()``/``glm()`` (and ``nnet::multinom``) fits, converted by the R package into
  coefficients, link and the formula's terms (:func:`from_r`);
* plain coefficient matrices from Python (:class:`LinearModel` itself).

Anything else is refused: a nonlinearity between two layers cannot be evaluated exactly
under CKKS (only additions and products are), and a polynomial stand-in would change the
model's answers; the three-party backend (:class:`privatekeras.Cluster`) evaluates it.
"""

import math

import numpy as np

from ..errors import UnsupportedLayerError

# The function the client applies to eta, by name (the spec's "output_activation").
INVERSE_LINKS = ("sigmoid", "softmax", "softmax0", "probit", "cauchit", "cloglog", "exp",
                 "inverse", "inverse_square", "square")
# R's link names -> the client's function (None: identity).
R_LINKS = {"identity": None, "logit": "sigmoid", "probit": "probit", "cauchit": "cauchit",
           "cloglog": "cloglog", "log": "exp", "inverse": "inverse", "1/mu^2":
           "inverse_square", "sqrt": "square"}
THREE_PARTY_HINT = ("a nonlinearity between layers cannot be evaluated exactly under CKKS "
                    "(the server can only add and multiply encrypted values): serve this "
                    "model with the three-party backend instead (privatekeras.Cluster / "
                    "pk_cluster())")


class LinearModel:
    """An affine map and the inverse link applied by the client.

    Args:
        weights: ``(d,)`` or ``(d, k)`` array: one column per output.
        bias: ``k`` values (default zeros).
        link: what the client applies to ``eta``: ``None``/``"identity"``, ``"sigmoid"``
            (logit link), ``"softmax"``, ``"softmax0"`` (softmax over ``[0, eta]``: a
            multinomial model with a baseline class), ``"probit"``, ``"cauchit"``,
            ``"cloglog"``, ``"exp"`` (log link), ``"inverse"``, ``"inverse_square"``,
            ``"square"`` (sqrt link); R's link names (``"logit"``, ``"log"``, ...) work too.
        feature_names: names of the ``d`` inputs (public: clients are told them).
        output_names: names of the ``k`` outputs (public).
        name: the model's name.
        r_terms: for models fitted in R, what an R client needs to build the model matrix
            from a data frame (formula, variables, factor levels, contrasts): public.
    """

    def __init__(self, weights, bias=None, link=None, feature_names=None, output_names=None,
                 name="linear model", r_terms=None):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim == 1:
            w = w[:, None]
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError("weights must be a (features,) or (features, outputs) matrix, got "
                             "shape {}".format(w.shape))
        b = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
        if b.shape != (w.shape[1],):
            raise ValueError("bias must have one value per output ({}), got {}".format(
                w.shape[1], b.size))
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError("the model's coefficients must be finite numbers (NA/NaN/Inf "
                             "found)")
        self.weights, self.bias = w, b
        self.link = normalise_link(link)
        d, k = w.shape
        self.feature_names = _names(feature_names, d, "x", "feature_names")
        self.output_names = _names(output_names, k, "eta", "output_names")
        self.name = str(name)
        self.r_terms = r_terms

    @property
    def n_features(self):
        return self.weights.shape[0]

    @property
    def n_outputs(self):
        return self.weights.shape[1]

    @property
    def output_activation(self):
        return self.link

    def linear_predictor(self, x):
        """``x W + b`` in clear (float64), for comparisons."""
        return np.asarray(x, np.float64) @ self.weights + self.bias

    def predict(self, x):
        """The model's prediction in clear: the inverse link of the linear predictor."""
        return inverse_link(self.link, self.linear_predictor(x))

    def __repr__(self):
        return "<privatekeras.ckks.LinearModel {!r}: {} features -> {} outputs, {}>".format(
            self.name, self.n_features, self.n_outputs, self.link or "identity")


def _names(names, n, prefix, what):
    if names is None:
        return ["{}{}".format(prefix, i + 1) for i in range(n)]
    names = [str(v) for v in (names if not isinstance(names, str) else [names])]
    if len(names) != n:
        raise ValueError("{} must have {} names, got {}".format(what, n, len(names)))
    return names


def normalise_link(link):
    """The client-side function's name for ``link`` (None for the identity)."""
    if link is None or link in ("identity", "linear"):
        return None
    link = str(link)
    if link in R_LINKS:
        return R_LINKS[link]
    if link not in INVERSE_LINKS:
        raise ValueError("unknown link {!r}: choose one of identity, {} (or R's link "
                         "names)".format(link, ", ".join(INVERSE_LINKS)))
    return link


def inverse_link(name, eta):
    """Apply the function named by a served model's ``output_activation`` to ``eta``."""
    eta = np.asarray(eta, dtype=np.float64)
    if name is None:
        return eta
    if name in ("sigmoid", "softmax"):
        from ..layers.activations import apply_final

        return apply_final(name, eta)
    if name == "softmax0":
        full = np.concatenate([np.zeros(eta.shape[:-1] + (1,)), eta], axis=-1)
        full = full - full.max(axis=-1, keepdims=True)
        e = np.exp(full)
        return e / e.sum(axis=-1, keepdims=True)
    if name == "probit":
        return 0.5 * np.vectorize(math.erfc)(-eta / math.sqrt(2.0))
    if name == "cauchit":
        return 0.5 + np.arctan(eta) / math.pi
    if name == "cloglog":
        return -np.expm1(-np.exp(eta))
    if name == "exp":
        return np.exp(eta)
    if name == "inverse":
        return 1.0 / eta
    if name == "inverse_square":
        return 1.0 / np.sqrt(eta)
    if name == "square":
        return eta * eta
    raise ValueError("unknown inverse link {!r}: update privatekeras".format(name))


def from_keras(model):
    """A :class:`LinearModel` from a Keras model (or a ``.keras``/``.h5`` path) made of Dense,
    identity-at-inference and per-feature affine (Normalization, Rescaling,
    BatchNormalization) layers in a chain, with at most a final softmax or sigmoid."""
    from ..convert import convert

    try:
        spec = convert(model)
    except UnsupportedLayerError as exc:
        raise UnsupportedLayerError("{}. For the CKKS backend only Dense, Dropout and "
                                    "Normalization layers without a hidden nonlinearity are "
                                    "served: {}".format(exc, THREE_PARTY_HINT)) from None
    if len(spec.input_shape) != 1:
        raise UnsupportedLayerError(
            "the CKKS backend serves models of one flat feature vector per row; this model "
            "takes inputs of shape {}: {}".format(tuple(spec.input_shape), THREE_PARTY_HINT))
    d = int(spec.input_shape[0])
    matrix, offset = np.eye(d), np.zeros(d)
    from ..layers import INPUT

    previous = INPUT
    for index, node in enumerate(spec.nodes):
        if node.inputs != [previous]:
            raise UnsupportedLayerError(
                "layer {!r} is not in a single chain of layers (branches and joins are not "
                "served by the CKKS backend: {})".format(node.name, THREE_PARTY_HINT))
        if node.kind == "dense":
            kernel, bias = (np.asarray(w, np.float64) for w in node.weights)
            matrix, offset = matrix @ kernel, offset @ kernel + bias
        elif node.kind == "affine":
            scale, shift = (np.asarray(w, np.float64) for w in node.weights)
            matrix, offset = matrix * scale, offset * scale + shift
        elif node.kind == "reshape" and len(node.shape) == 1:
            pass
        else:
            raise UnsupportedLayerError(
                "layer {!r} ({}) is not served by the CKKS backend: {}".format(
                    node.name, node.kind, THREE_PARTY_HINT))
        previous = index
    return LinearModel(matrix, offset, link=spec.output_activation, name=spec.name)


def from_r(coefficients, intercept, link, feature_names, output_names=None, name="glm",
           r_terms=None):
    """A :class:`LinearModel` from an R fit's coefficients (called by the R package)."""
    w = np.asarray(coefficients, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    return LinearModel(w, intercept, link=link, feature_names=feature_names,
                       output_names=output_names, name=name, r_terms=r_terms)


def as_linear_model(model):
    """Whatever ``share(model, server)`` was given, as a :class:`LinearModel`."""
    if isinstance(model, LinearModel):
        return model
    if isinstance(model, np.ndarray):
        return LinearModel(model)
    if isinstance(model, (tuple, list)) and len(model) == 2 and not hasattr(model, "layers"):
        return LinearModel(model[0], model[1])
    if isinstance(model, dict):
        return LinearModel(**model)
    return from_keras(model)
