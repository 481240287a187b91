"""A client of the CKKS server: keys, encryption and decryption here, in this process.

The client generates a CKKS key with TenSEAL for the served parameters (checked against the
HE standard's 128-bit table first), keeps the secret key in this process, and sends the
server only its public context (parameters; no key: the evaluation needs none) and its rows,
encrypted column by column (one ciphertext per feature, up to N/2 rows each). It fetches the
encrypted outputs with its per-query fetch secret, decrypts them here, and
:meth:`CKKSClient.predict_proba` applies the inverse link here. TenSEAL draws its randomness
from SEAL's default PRNG, seeded from the operating system (``std::random_device``:
``/dev/urandom`` on Linux).
"""

import json
import os
import time

import numpy as np

from .. import wire
from ..client import FETCH_WAIT, Connection, _all, numeric
from ..errors import AccessDeniedError, InputError, NotServingError, WorkerUnavailableError
from . import params as ckks_params
from .engine import make_context, public_bytes
from .model import inverse_link


class CKKSClient(Connection):
    """A connection to the model served on a CKKS :class:`~privatekeras.Server` (made by
    :func:`privatekeras.connect`).

    Args:
        server: the :class:`~privatekeras.Server` (not started by this process).
        input_shape, output_shape: optional ``(1, d)`` / ``(1, k)``, checked against the
            served model at the first query.
        timeout: seconds to wait for the server, for a served model, and for each answer.
    """

    def __init__(self, server, input_shape=None, output_shape=None, timeout=60.0):
        super().__init__(server, timeout)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.output_shape = None if output_shape is None else tuple(
            int(d) for d in output_shape)
        self._keys = None  # (model id, TenSEAL context with the secret key, public bytes)
        self.key_seconds = None  # time of the last key generation
        self.bytes_sent = 0  # ciphertexts and contexts sent, over this client's life
        self.bytes_received = 0

    def __repr__(self):
        spec = self._spec
        model = "" if spec is None else " model {!r} ({} features -> {} outputs)".format(
            spec["name"], spec["input_shape"][1], spec["output_shape"][1])
        return "<privatekeras.CKKSClient server={}{}{}>".format(
            self.cluster.hosts[0], model, "" if self._keys is None else ", keys made here")

    # -- the server and the served model ---------------------------------------------------
    def _where(self):
        return "the CKKS server {}".format(self.cluster.hosts[0])

    def _start_hint(self):
        return ("is the CKKS server started? The model owner starts it with "
                "Server(...).start() / pk_start()")

    def _explain(self, exc):
        return str(server_error(exc, self.cluster))

    def _served_spec(self):
        board = self._serving_board()
        spec = json.loads(board.spec_json)
        if spec.get("protocol") != "ckks":
            raise InputError("the server at {} does not serve a CKKS model".format(
                self.cluster.hosts[0]))
        try:
            ckks_params.check_secure(spec["ckks"])
        except ValueError as exc:
            raise InputError("refusing the served model's encryption parameters: {}".format(
                exc)) from None
        for mine, theirs, what in ((self.input_shape, spec["input_shape"], "input_shape"),
                                   (self.output_shape, spec["output_shape"], "output_shape")):
            if mine is not None and tuple(mine[1:]) != tuple(theirs[1:]):
                raise InputError("the served model takes {} features and returns {} outputs "
                                 "per row; this client was connected with {}={}".format(
                                     spec["input_shape"][1], spec["output_shape"][1], what,
                                     mine))
        spec["session"] = board.session
        return spec

    def _ensure_keys(self):
        """Keys for the served model's parameters, made here once per served model."""
        spec = self._spec
        if self._keys is None or self._keys[0] != spec["ckks"]:
            t0 = time.perf_counter()
            ctx = make_context(spec["ckks"], secret=True)
            public = public_bytes(ctx)
            self.key_seconds = time.perf_counter() - t0
            self._keys = (spec["ckks"], ctx, public)
        return self._keys

    @property
    def features(self):
        """The served model's feature names, in the order of the columns (None before the
        first query or :meth:`describe`)."""
        return None if self._spec is None else list(self._spec["features"])

    def describe(self):
        """The served model's public spec (waits for serving to begin)."""
        self._prepare()
        return {k: v for k, v in self._spec.items() if k != "session"}

    def _prepare(self):
        if self._link is None:
            self._open()
        if self._spec is None:
            self._spec = self._served_spec()
        return self._ensure_keys()

    # -- queries ---------------------------------------------------------------------------
    def _check_input(self, x, d):
        x = numeric(x, "matrix")
        if x.ndim == 1 and d is not None and x.shape[0] == d:
            x = x[None, :]
        if x.ndim != 2:
            raise InputError("the input must be a matrix of rows (n, features), got shape "
                             "{}".format(x.shape))
        if d is not None and x.shape[1] != d:
            raise InputError("the served model takes {} features per row ({}), the input has "
                             "{}".format(d, ", ".join(self._spec["features"]), x.shape[1]))
        if x.shape[0] == 0:
            raise InputError("the input is an empty batch (0 rows)")
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise InputError("the input contains NaN or infinite values; encrypted prediction "
                             "needs finite numbers")
        return x

    def _check_range(self, x, consequence="the encryption parameters hold no more"):
        super()._check_range(x, consequence)
        spec = self._spec
        bound = float(spec["input_bound"])
        if np.abs(x).max() > bound:
            raise InputError(
                "the input has values up to {:g} in absolute value; the served model's "
                "encryption parameters hold inputs up to {:g}: the model owner declares a "
                "wider input_range at share()".format(np.abs(x).max(), bound))

    def query(self, x):
        """Encrypted prediction: the linear predictor ``eta = x W + b`` of each row of ``x``
        (a matrix ``(n, d)``, or one row), as an ``(n, k)`` float64 array. Any number of rows:
        up to N/2 rows travel in one query (one ciphertext per feature)."""
        x = self._check_input(x, None if self._spec is None else self._spec["input_shape"][1])
        _, ctx, public = self._prepare()
        x = self._check_input(x, self._spec["input_shape"][1])
        self._check_range(x)
        rows = int(self._spec["ckks"]["slots"])
        return np.concatenate([self._query_rows(ctx, public, x[i:i + rows])
                               for i in range(0, x.shape[0], rows)], axis=0)

    def predict_proba(self, x):
        """Encrypted prediction followed by the model's inverse link (sigmoid for a logistic
        model, softmax, exp for a log link, ...), applied here: what ``predict(fit, type =
        "response")`` or ``model.predict()`` gives in clear."""
        eta = self.query(x)
        return inverse_link(self._spec.get("output_activation"), eta)

    def _query_rows(self, ctx, public, rows):
        from ._tenseal import tenseal

        ts = tenseal()

        spec = self._spec
        blobs = [ts.ckks_vector(ctx, rows[:, j].tolist()).serialize()
                 for j in range(rows.shape[1])]
        query_id = os.urandom(16).hex()
        secret = os.urandom(32)
        submit = wire.M.SubmitRequest(query_id=query_id, model_id=spec["model_id"],
                                      session=spec["session"], fetch_digest=wire.digest(secret),
                                      context=public, blobs=blobs)
        self.bytes_sent += len(public) + sum(len(b) for b in blobs)
        try:
            reply = self._link.run(self._exchange(query_id, submit, secret))
        except NotServingError:
            self._spec = None
            raise
        except (WorkerUnavailableError, AccessDeniedError) as exc:
            self._forget()
            raise server_error(exc, self.cluster) from None
        k = spec["output_shape"][1]
        if len(reply.blobs) != k:
            raise WorkerUnavailableError("the server answered {} ciphertexts for {} outputs".format(
                len(reply.blobs), k))
        self.bytes_received += sum(len(b) for b in reply.blobs)
        out = np.empty((rows.shape[0], k))
        for j, blob in enumerate(reply.blobs):
            values = np.asarray(ts.ckks_vector_from(ctx, blob).decrypt())
            if values.shape != (rows.shape[0],):
                raise WorkerUnavailableError("the server answered {} values for {} rows".format(
                    values.size, rows.shape[0]))
            out[:, j] = values
        return out

    async def _exchange(self, query_id, submit, secret):
        """Submit, with the Fetch right behind it; ask again while the server says "not
        yet", until ``timeout``."""
        import asyncio

        stub, name = self._link.stubs[0], self.cluster.worker_names[0]
        deadline = time.monotonic() + self.timeout

        def fetch():
            wait = max(0.0, min(FETCH_WAIT, deadline - time.monotonic()))
            return stub.Fetch(wire.M.FetchRequest(query_id=query_id, fetch_secret=secret,
                                                  wait_seconds=wait), timeout=wait + 10.0)

        sent = stub.Submit(submit, timeout=self.timeout)
        call = fetch()
        try:
            await _all([sent], [name])
        except BaseException:
            call.cancel()
            raise
        while True:
            asked = time.monotonic()
            reply = (await _all([call], [name]))[0]
            if reply.ready:
                return reply
            if time.monotonic() > deadline:
                raise WorkerUnavailableError("no answer from the CKKS server within {:.0f} s: "
                                             "it is overloaded, stuck or gone".format(
                                                 self.timeout))
            if time.monotonic() - asked < 0.05:
                await asyncio.sleep(0.05)
            call = fetch()

def server_error(exc, server):
    """``exc`` with the server named as such ("the CKKS server HOST", not "worker worker0")."""
    text = str(exc).replace("worker {}".format(server.worker_names[0]),
                            "the CKKS server {}".format(server.hosts[0]))
    try:
        return type(exc)(text)
    except Exception:  # noqa: BLE001 - an exception class with another signature
        return exc


def connect(server, input_shape=None, output_shape=None, timeout=60.0):
    """Connect to the model served on a CKKS server; returns a :class:`CKKSClient`."""
    return CKKSClient(server, input_shape, output_shape, timeout=timeout)._open()
