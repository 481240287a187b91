"""The CKKS server: one worker process that evaluates a clear model on encrypted rows.

It is the three-party worker (:class:`privatekeras.worker.WorkerServer`) with one party: the
same API with mutual TLS and role checks (:mod:`privatekeras.wire`), the same board, serving
session, query ids, fetch secrets (a client's answer is released only for the secret whose
SHA-256 came with its query), bounded waits, query limits and expiry. What differs:

* no TensorFlow, no compute port, no peers: nothing to confine, nobody to wait for;
* ``Upload`` carries the model in clear (weights as float64) with its public spec;
* ``Prepare`` builds the evaluation (:class:`privatekeras.ckks.engine.Engine`);
* ``Submit`` carries the client's public context and one ciphertext per feature; the serving
  loop (the owner's ``Serve`` call, unchanged) evaluates it, and ``Fetch`` returns the
  encrypted outputs.

The server never holds a secret key: its own context has none, and a query whose context
carries one is refused (:meth:`Engine.check_context`).
"""

import json
import threading
import time

import numpy as np

from .. import wire
from ..log import say
from ..worker import MODEL_ID, WorkerConfig, WorkerServer
from ..wire import M, Refusal
from . import params as ckks_params

MAX_QUERY_BLOBS = 4096  # ciphertexts in one query (one per feature)


class ServerConfig(WorkerConfig):
    """Where the one CKKS server listens (its certificate is the local CA's ``worker0``, or
    the hosts file's)."""

    def __init__(self, api, credentials, api_listen=None, name="worker0"):
        self.index, self.names, self.api, self.compute = 0, [name], [api], []
        self.credentials, self.job = credentials, None
        self.api_listen = api_listen or api
        self.compute_port = None


class CKKSModel:
    """The served model as the server holds it: public spec, clear weights, the engine, and
    the queries' encrypted inputs until evaluated."""

    def __init__(self, spec, weights, bias):
        self.spec, self.weights, self.bias = spec, weights, bias
        self.id = spec["model_id"]
        self.in_shape = tuple(spec["input_shape"])
        self.out_shape = tuple(spec["output_shape"])
        self.engine = None
        self.inputs = {}  # query id -> (context bytes, [ciphertext bytes])

    def drop(self, ids):
        """Forget these queries' inputs (expired)."""
        for qid in ids:
            self.inputs.pop(qid, None)

    def client_spec(self):
        """What clients are told: shapes, parameters, feature names, link, input range, the
        R terms; not the weights."""
        keep = ("model_id", "name", "protocol", "batch_size", "input_shape", "output_shape",
                "output_activation", "input_range", "input_bound", "features", "outputs",
                "ckks", "r_terms")
        return {k: self.spec[k] for k in keep if k in self.spec}


def parse_spec(text):
    """The public spec of a CKKS upload, checked."""
    try:
        spec = json.loads(text)
        d, k = spec["input_shape"][1], spec["output_shape"][1]
        ok = (isinstance(spec, dict) and MODEL_ID.match(str(spec.get("model_id", "")))
              and spec.get("protocol") == "ckks"
              and len(spec["input_shape"]) == 2 and len(spec["output_shape"]) == 2
              and isinstance(d, int) and isinstance(k, int) and 1 <= d <= MAX_QUERY_BLOBS
              and 1 <= k <= 4096 and len(spec["features"]) == d)
        if ok:
            ckks_params.check_secure(spec["ckks"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        ok = False
    if not ok:
        raise Refusal("BadInput", "the uploaded CKKS model spec is malformed")
    spec.setdefault("name", "model")
    return spec


class CKKSServer(WorkerServer):
    """The one-process CKKS server (see the module's text)."""

    PEERS = ()  # no other workers: nothing to check while idle, nobody to ask about pickups

    def start(self):
        """Open the API; returns self. (No TensorFlow, no peers.)"""
        self._open_api()
        threading.Thread(target=self._janitor, name="privatekeras-janitor", daemon=True).start()
        return self

    # -- the owner's calls -----------------------------------------------------------------
    def Upload(self, chunks, context, peer):
        spec, tensors = self._read_upload(chunks, parse_spec)
        d, k = spec["input_shape"][1], spec["output_shape"][1]
        if len(tensors) != 2:
            raise Refusal("BadInput", "a CKKS upload carries 2 tensors (weights, bias), got "
                                      "{}".format(len(tensors)))
        try:
            weights = wire.array(tensors[0], (d, k)).view(np.float64)
            bias = wire.array(tensors[1], (k,)).view(np.float64)
        except Exception as exc:  # noqa: BLE001 - PrivateKerasError from wire.array
            raise Refusal("BadInput", str(exc)) from None
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise Refusal("BadInput", "the model's weights must be finite")
        with self._cv:
            if self._state == wire.SERVING:
                raise Refusal("Busy", "a model is being served on this server: stop serving "
                                      "before uploading another")
            self._model = None
            self._state, self._message = wire.EMPTY, "receiving a model"
            self._fail_all("NotServing", "the model owner uploaded another model")
            self._model = CKKSModel(spec, weights, bias)
            self._steps = {}
            self._state, self._message = wire.LOADED, "model {!r} uploaded".format(spec["name"])
        say("%s: holds model %r (%s) in clear from %s: %d features -> %d outputs", self.config.name,
            spec["name"], spec["model_id"], peer[0], d, k)
        return self.Status(None, context, peer)

    def Prepare(self, request, context, peer):
        from .engine import Engine, QueryRefused

        model = self._model
        if model is None or model.id != request.model_id:
            raise Refusal("Failed", "the server does not hold model {}: upload it "
                                    "first".format(request.model_id))
        t0 = time.monotonic()
        yield M.Progress(message="preparing the encrypted evaluation ({})".format(
            ckks_params.describe(model.spec["ckks"])))
        try:
            engine = Engine(model.spec["ckks"], model.weights, model.bias, log=self._log)
        except QueryRefused as exc:
            raise Refusal("BadInput", str(exc)) from None
        with self._cv:
            if self._model is model:
                model.engine = engine
                self._steps = {1: engine}
                self._state, self._message = wire.READY, "model {!r} ready".format(
                    model.spec["name"])
        yield M.Progress(message="ready in {:.2f} s".format(time.monotonic() - t0),
                         seconds=time.monotonic() - t0)
        yield M.Progress(message="ready", done=True)

    def _log(self, message, *args):
        say("%s: " + message, self.config.name, *args)

    # -- serving ---------------------------------------------------------------------------
    def _evaluate(self, ids, session):
        """Evaluate these queries (the serving loop's step); returns the evaluation time."""
        from .engine import QueryRefused

        model = self._model
        t0 = time.perf_counter()
        for qid in ids:
            with self._cv:
                query = self._queries.get(qid)
                payload = model.inputs.pop(qid, None)
            if query is None or payload is None:
                continue  # expired meanwhile
            try:
                output, error = model.engine.evaluate(*payload), None
            except QueryRefused as exc:
                output, error = None, ("BadInput", str(exc))
            with self._cv:
                if error is None:
                    self._answered += 1
                    query.output = output
                else:
                    query.error = error
                query.ready.set()
                self._cv.notify_all()
        return time.perf_counter() - t0

    def _reply(self, query):
        return M.FetchReply(ready=True, blobs=list(query.output))

    # -- the clients' calls ----------------------------------------------------------------
    def Submit(self, request, context, peer):
        model = self._submitted_model(request)
        d = model.in_shape[1]
        if len(request.blobs) != d:
            raise Refusal("BadInput", "the served model takes {} features: a query carries one "
                                      "ciphertext per feature, got {}".format(
                                          d, len(request.blobs)))
        if not request.context:
            raise Refusal("BadInput", "a query carries the client's public context")
        with self._cv:
            self._register(request, check_serving=True)
            model.inputs[request.query_id] = (bytes(request.context), list(request.blobs))
            self._mark_ready(request.query_id)
        return M.Empty()

    # -- no peers --------------------------------------------------------------------------
    def _no_peers(self, method):
        raise Refusal("Failed", "{}: a CKKS server has no peer workers".format(method))

    def Trace(self, request, context, peer):
        self._no_peers("Trace")
