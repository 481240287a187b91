"""The server's encrypted evaluation (TenSEAL): ``eta = x W + b`` on column-packed rows.

A query holds one ciphertext per feature: slot ``i`` of ciphertext ``j`` is feature ``j`` of
row ``i`` (up to N/2 rows per query). Output ``k`` is then ``sum_j W[j, k] * ct_j + b_k``:
products of ciphertexts by plain numbers and additions only, so the evaluation needs no
relinearisation or Galois key, and its cost hardly depends on the number of rows. Nothing is
rescaled, so every term must carry the same scale ``2^(2s)``: the bias enters before the
products, as ``(ct_j0 + b_k / W[j0, k]) * W[j0, k]`` with ``j0`` the column's largest weight
(the parameters leave room and precision for ``b_k / W[j0, k]``; see
:mod:`privatekeras.ckks.params`), and the client decodes at scale ``2^(2s)``.

The server evaluates in a context of its own made from the served parameters, without a secret
key (a ciphertext made under other parameters fails to load: SEAL checks its parameter id).
The client's public context, sent with each query, is checked once per distinct context: it
must not carry a secret key, and the query's ciphertexts must load in it.
"""

import collections
import hashlib
import threading

import numpy as np

MAX_CONTEXT_BYTES = 8 * 1024 * 1024
MAX_CONTEXTS = 256  # client contexts remembered (by SHA-256)


class QueryRefused(ValueError):
    """A query the server will not evaluate (its message is for the client)."""


def _tenseal():
    from ._tenseal import tenseal

    return tenseal()


def make_context(params, secret=True):
    """A TenSEAL CKKS context for ``params`` (symmetric encryption: the client holding the
    secret key encrypts with it; nobody else encrypts). ``secret=False``: the same parameters
    in a context without any key, as the server holds it."""
    ts = _tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, int(params["poly_modulus_degree"]),
                     coeff_mod_bit_sizes=[int(b) for b in params["coeff_mod_bit_sizes"]],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.global_scale = 2.0 ** int(params["scale_bits"])
    if not secret:
        ctx = ts.context_from(public_bytes(ctx))
        ctx.global_scale = 2.0 ** int(params["scale_bits"])
    ctx.auto_rescale = False
    ctx.auto_relin = False
    ctx.auto_mod_switch = False
    return ctx


def public_bytes(ctx):
    """The context's parameters without the secret key (and without relinearisation, Galois
    or public keys: this evaluation needs none)."""
    return ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                         save_relin_keys=False)


def effective_terms(weights, scale_bits):
    """Per output: ``(j0, w0, [(j, w), ...])``: the largest weight of the column and the other
    weights that do not round to zero at the scale (a zero product is not computed)."""
    tiny = 2.0 ** -(int(scale_bits) + 1)
    plan = []
    for k in range(weights.shape[1]):
        column = weights[:, k]
        j0 = int(np.argmax(np.abs(column)))
        if abs(column[j0]) <= tiny:
            plan.append(None)
            continue
        rest = [(j, float(column[j])) for j in range(len(column))
                if j != j0 and abs(column[j]) > tiny]
        plan.append((j0, float(column[j0]), rest))
    return plan


class Engine:
    """The served model on the server: its parameters, weights and evaluation."""

    def __init__(self, params, weights, bias, log=None):
        self.params = params
        self.weights, self.bias = weights, bias
        self.slots = int(params["slots"])
        self.context = make_context(params, secret=False)
        if self.context.is_private() or self.context.has_secret_key():
            raise RuntimeError("the server's own context holds a secret key")  # never
        self.plan = effective_terms(weights, params["scale_bits"])
        if any(p is None for p in self.plan):
            raise QueryRefused("an output of the model does not depend on any input")
        self._contexts = collections.OrderedDict()  # digest -> True (checked)
        self._lock = threading.Lock()
        self._log = log or (lambda *a: None)
        self.contexts_checked = 0

    def check_context(self, blob, first_ciphertext):
        """Check a client's public context (once per distinct context)."""
        ts = _tenseal()
        digest = hashlib.sha256(blob).hexdigest()
        with self._lock:
            if digest in self._contexts:
                self._contexts.move_to_end(digest)
                return
        if not blob or len(blob) > MAX_CONTEXT_BYTES:
            raise QueryRefused("a query carries the client's public TenSEAL context (at most "
                               "{} bytes), got {} bytes".format(MAX_CONTEXT_BYTES, len(blob)))
        try:
            ctx = ts.context_from(blob)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            raise QueryRefused("the query's context is not a TenSEAL context ({})".format(
                _line(exc))) from None
        if ctx.is_private() or ctx.has_secret_key():
            del ctx
            raise QueryRefused(
                "the query's context carries a secret key: refused, and not kept (a client "
                "must send its context without the secret key; the server never needs it)")
        try:
            ts.ckks_vector_from(ctx, first_ciphertext)
        except Exception as exc:  # noqa: BLE001
            raise QueryRefused("the query's ciphertexts were not made under its context "
                               "({})".format(_line(exc))) from None
        with self._lock:
            self._contexts[digest] = True
            while len(self._contexts) > MAX_CONTEXTS:
                self._contexts.popitem(last=False)
            self.contexts_checked += 1
        self._log("client context %s: public (no secret key), parameters as served",
                  digest[:12])

    def evaluate(self, context_blob, blobs):
        """The encrypted outputs (serialized ciphertexts, one per output) for a query's
        encrypted columns; QueryRefused for a malformed query."""
        ts = _tenseal()
        d = self.weights.shape[0]
        if len(blobs) != d:
            raise QueryRefused("the served model takes {} features: a query carries one "
                               "ciphertext per feature, got {}".format(d, len(blobs)))
        self.check_context(context_blob, blobs[0])
        try:
            columns = [ts.ckks_vector_from(self.context, b) for b in blobs]
        except Exception as exc:  # noqa: BLE001
            raise QueryRefused("a ciphertext was not made under the served model's CKKS "
                               "parameters ({})".format(_line(exc))) from None
        rows = {c.size() for c in columns}
        if len(rows) != 1 or not 1 <= min(rows) <= self.slots:
            raise QueryRefused("every feature's ciphertext must hold the same number of rows "
                               "(1..{}), got {}".format(self.slots, sorted(rows)))
        outputs = []
        for k, (j0, w0, rest) in enumerate(self.plan):
            shift = float(self.bias[k]) / w0
            acc = columns[j0] + shift if shift != 0.0 else columns[j0]
            acc = acc * w0
            for j, w in rest:
                acc += columns[j] * w
            outputs.append(acc.serialize())
        return outputs


def _line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
