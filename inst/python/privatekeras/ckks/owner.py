"""The model owner's side of the CKKS backend: upload a model, in clear, to the one server.

The server sees the model (its weights and link); what it never sees is a client's input or
answer: those stay encrypted under the client's key. The owner's process only uploads and
then holds the serving call open, as with the three-party backend
(:class:`privatekeras.owner.SharedModel` is reused: ``serve()``, ``stop()``).
"""

import json
import os

import numpy as np

from .. import wire
from ..convert import check_input_range
from ..log import say
from . import params as ckks_params
from .engine import effective_terms
from .model import as_linear_model

DEFAULT_INPUT_BOUND = 1024.0  # |x| a client may send when the owner declares no input_range
UPLOAD_TIMEOUT = 120.0
PREPARE_TIMEOUT = 120.0


class ServedSpec:
    """What :class:`~privatekeras.owner.SharedModel` shows of a model served on CKKS."""

    def __init__(self, model):
        self.model = model
        self.name = model.name
        self.output_activation = model.link

    def __repr__(self):
        return repr(self.model)


def public_spec(model, input_range):
    """The spec the server is told (there is no weight
    in it), with the CKKS parameters chosen for this model."""
    w, b = model.weights, model.bias
    plan = effective_terms(w, ckks_params.MAX_SCALE_BITS)
    dead = [model.output_names[k] for k, p in enumerate(plan) if p is None]
    if dead:
        raise ValueError("output(s) {} of the model do not depend on any input (all their "
                         "weights are 0): drop them".format(", ".join(dead)))
    bound = DEFAULT_INPUT_BOUND if input_range is None else max(abs(v) for v in input_range)
    shift = max(abs(b[k]) / abs(w[p[0], k]) for k, p in enumerate(plan))
    chosen = ckks_params.choose(np.abs(w).sum(axis=0).max(), bound, np.abs(b).max(),
                                w.shape[0], shift=shift)
    d, k = w.shape
    return {
        "model_id": os.urandom(8).hex(),
        "name": model.name,
        "protocol": "ckks",
        "batch_size": chosen["slots"],  # rows per query (one ciphertext slot each)
        "max_group": 1,
        "input_shape": [1, d],
        "output_shape": [1, k],
        "output_activation": model.link,
        "input_range": None if input_range is None else list(input_range),
        "input_bound": bound,
        "features": model.feature_names,
        "outputs": model.output_names,
        "ckks": chosen,
        "r_terms": model.r_terms,
    }


def _as_bits(array):
    """A float64 array as the int64 tensor the wire carries (its IEEE-754 bits, exactly)."""
    return wire.tensor(np.ascontiguousarray(array, dtype="<f8").view("<i8"))


def share(model, server, input_range=None, name=None):
    """Upload a linear model in clear to a CKKS server and have it ready to serve.

    Args:
        model: a Keras model (or ``.keras``/``.h5`` path) of Dense, Dropout and Normalization
            layers without a hidden nonlinearity; a :class:`privatekeras.ckks.LinearModel`;
            a weight matrix ``(d, k)``; or ``(weights, bias)``. (R ``lm``/``glm`` fits come
            through the R package.)
        server: a started :class:`privatekeras.Server` (``scheme="ckks"``).
        input_range: ``(lo, hi)``: the values clients' inputs take. The CKKS parameters are
            chosen to hold every linear predictor for inputs within it, and clients refuse
            inputs outside it. Default: ``|x| <= 1024``.
        name: the model's name (default: the model's own).
    Returns:
        a :class:`privatekeras.owner.SharedModel`: ``serve()`` it.
    """
    from ..owner import SharedModel

    input_range = check_input_range(input_range, bound=None)  # CKKS: any finite range
    model = as_linear_model(model)
    if name is not None:
        model.name = str(name)
    public = public_spec(model, input_range)
    say("uploading model {!r} IN CLEAR to the CKKS server {} (the server sees the model; "
        "clients' inputs and outputs stay encrypted under their own keys): {} features -> {} "
        "outputs, {}".format(model.name, server.hosts[0], model.n_features, model.n_outputs,
                             ckks_params.describe(public["ckks"])))
    stub, where = server.stubs("owner")[0], server.worker_names[0]
    chunks = [wire.M.UploadChunk(spec_json=json.dumps(public)),
              wire.M.UploadChunk(weights=[_as_bits(model.weights), _as_bits(model.bias)])]
    try:
        stub.Upload(iter(chunks), timeout=UPLOAD_TIMEOUT)
        for progress in stub.Prepare(wire.M.PrepareRequest(model_id=public["model_id"]),
                                     timeout=PREPARE_TIMEOUT):
            if progress.message and not progress.done:
                say(progress.message)
    except Exception as exc:  # noqa: BLE001 - translated
        from .client import server_error

        raise server_error(wire.translate(exc, where), server) from None
    return SharedModel(server, ServedSpec(model), public)
