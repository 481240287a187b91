"""The client's side: share inputs here, reconstruct answers here.

For each query the client encodes its input in fixed point and splits it into ABY3 shares
with the OS CSPRNG, draws a fresh random query id and, per worker, a fresh fetch secret; it
submits to each worker only that worker's shares (with the SHA-256 of that worker's secret),
fetches each worker's answer shares by presenting the secret, and alone reconstructs the
answer. It needs numpy and grpcio, not TensorFlow.
"""

import os
import threading
import time

import numpy as np

from . import wire
from .deploy.pki import CredentialsError
from .errors import AccessDeniedError, InputError, NotServingError, WorkerUnavailableError
from .mpc.encoding import FIXED64, reconstruct_values, share_values

FETCH_WAIT = 5.0  # seconds one Fetch call waits on the worker before asking again


def _as_shape(shape, what):
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InputError("{} must be a sequence of positive integers, got {!r}".format(
            what, shape)) from None
    if not dims or any(d < 1 for d in dims) or any(float(d) != float(s) for d, s in
                                                   zip(dims, shape)):
        raise InputError("{} must be a sequence of positive integers, got {!r}".format(
            what, shape))
    return dims


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _gather(futures, names):
    """Results of calls to the workers, in order; the first failure cancels the others and
    is raised (translated, naming its worker)."""
    done = threading.Event()
    remaining = [len(futures)]
    lock = threading.Lock()

    def finished(future):
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0 or (not future.cancelled() and future.exception() is not None):
                done.set()

    for future in futures:
        future.add_done_callback(finished)
    done.wait()
    for future, name in zip(futures, names):
        if future.done() and not future.cancelled() and future.exception() is not None:
            for other in futures:
                other.cancel()
            raise wire.translate(future.exception(), name) from None
    return [future.result() for future in futures]


class Client:
    """A connection to the model served on a cluster (made by :func:`connect`).

    Args:
        cluster: a :class:`~privatekeras.Cluster` with the workers' addresses (not started
            by this process).
        input_shape: the shape of one query, batch first, e.g. ``(1, 28, 28, 1)``.
        output_shape: the shape of one answer, batch first, e.g. ``(1, 10)``.
        timeout: seconds to wait for the workers, for a served model, and for each answer.
    """

    def __init__(self, cluster, input_shape, output_shape, timeout=60.0):
        self.cluster = cluster
        self.input_shape = _as_shape(input_shape, "input_shape")
        self.output_shape = _as_shape(output_shape, "output_shape")
        if self.input_shape[0] != self.output_shape[0]:
            raise InputError("input_shape and output_shape must have the same batch size, got "
                             "{} and {}".format(self.input_shape, self.output_shape))
        self.timeout = float(timeout)
        self._spec = None
        self._stubs = None

    def __repr__(self):
        return "<privatekeras.Client input={} output={} cluster={}>".format(
            self.input_shape, self.output_shape, ", ".join(self.cluster.hosts))

    # -- the workers and the served model ---------------------------------------------------
    def _open(self):
        """Reach the three workers, retrying until ``timeout`` (on one machine the cluster
        may not even be started yet: its credentials appear when it is); returns self."""
        from .deploy.pki import CredentialsError

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._stubs = self.cluster.stubs("client")
                self.cluster.status("client", timeout=max(1.0, min(5.0, self.timeout)))
                return self
            except (WorkerUnavailableError, CredentialsError) as exc:
                self._forget()
                if isinstance(exc, CredentialsError) and self.cluster.config is not None:
                    raise  # a hosts file's credentials do not appear by waiting
                if time.monotonic() > deadline:
                    hint = ("is the cluster started? The model owner starts it with "
                            "Cluster.start() / pk_start()" if self.cluster.config is None else
                            "are the workers running (`privatekeras worker --config ...` on "
                            "each worker host)?")
                    raise type(exc)("{} (waited {:.0f} s): {}".format(exc, self.timeout,
                                                                     hint)) from None
                time.sleep(0.2)

    def _forget(self):
        """Drop the channels (and the credentials they hold): the next call reloads them, as
        after the owner restarted a cluster with a new throw-away CA."""
        self._spec = self._stubs = None
        self.cluster.forget("client")

    def _served_spec(self):
        """The served model's public spec, waiting up to ``timeout`` for serving to begin."""
        deadline = time.monotonic() + self.timeout
        while True:
            board = self.cluster.status("client", timeout=5.0)[0]
            if board.state == wire.SERVING:
                break
            if time.monotonic() > deadline:
                raise NotServingError(
                    "no model is being served on cluster {} (waited {:.0f} s): start serving "
                    "with serve() in the model owner's process first".format(
                        self.cluster.hosts, self.timeout))
            time.sleep(0.05)
        import json

        spec = json.loads(board.spec_json)
        if tuple(spec["input_shape"][1:]) != self.input_shape[1:] or \
                tuple(spec["output_shape"][1:]) != self.output_shape[1:]:
            raise InputError(
                "the served model takes inputs of shape {} and returns {} (batch first); this "
                "client was connected with input_shape={} and output_shape={}".format(
                    tuple(spec["input_shape"]), tuple(spec["output_shape"]), self.input_shape,
                    self.output_shape))
        if spec.get("fixed_point") != FIXED64.describe():
            raise InputError("the served model uses the fixed-point encoding {}, this client "
                             "{}: update privatekeras".format(spec.get("fixed_point"),
                                                              FIXED64.describe()))
        spec["session"] = board.session
        return spec

    # -- queries ------------------------------------------------------------------------
    def _check_input(self, x):
        if isinstance(x, (list, tuple)):
            x = np.asarray(x)
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)  # tf.Tensor, R arrays via reticulate, ...
            except Exception:  # noqa: BLE001
                raise InputError("the input must be a numeric array, got {}".format(
                    type(x).__name__)) from None
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or
                                       np.issubdtype(x.dtype, np.floating)):
            raise InputError("the input must be a numeric (integer or floating) array, got "
                             "dtype {}".format(x.dtype))
        want = self.input_shape[1:]
        if x.shape == want:
            x = x[None, ...]
        if x.ndim != len(self.input_shape) or x.shape[1:] != want:
            raise InputError("the input has shape {}, but this client sends {} (any batch "
                             "size, then {})".format(x.shape, self.input_shape, want))
        if x.shape[0] == 0:
            raise InputError("the input is an empty batch (0 rows)")
        x = x.astype(np.float64)
        FIXED64.encode(x)  # a bad value fails the query before anything is sent
        return x

    def query(self, x):
        """Private prediction: returns the logits for ``x`` (batch first) as a numpy array.

        ``x`` may hold any number of rows; they are sent in batches of the served batch size
        (the last one padded with zeros, which are discarded).
        """
        x = self._check_input(x)
        if self._stubs is None:
            self._open()
        if self._spec is None:
            self._spec = self._served_spec()
        b = self._spec["batch_size"]
        n = x.shape[0]
        pad = (-n) % b
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:])], axis=0)
        outs = [self._query_batch(x[i:i + b]) for i in range(0, x.shape[0], b)]
        return np.concatenate(outs, axis=0)[:n].astype(np.float32)

    def predict_proba(self, x):
        """Private prediction followed by a softmax computed here, on the client."""
        return softmax(self.query(x).astype(np.float64)).astype(np.float32)

    def _query_batch(self, xb):
        spec, names = self._spec, self.cluster.worker_names
        shares = share_values(xb)
        query_id = os.urandom(16).hex()
        secrets = [os.urandom(32) for _ in range(3)]
        submits = [stub.Submit.future(wire.M.SubmitRequest(
            query_id=query_id, model_id=spec["model_id"], session=spec["session"],
            shares=[wire.tensor(s) for s in shares[i]], fetch_digest=wire.digest(secrets[i])),
            timeout=self.timeout) for i, stub in enumerate(self._stubs)]
        # Each Fetch goes right behind its Submit (the worker waits for the Submit if the
        # Fetch overtakes it), so the answer costs no extra round trip.
        fetches = self._fetch_calls(query_id, secrets, range(3), time.monotonic() + self.timeout)
        try:
            try:
                _gather(submits, names)
            except BaseException:
                for call in fetches:
                    call.cancel()
                raise
            answers = self._fetch(query_id, secrets, fetches)
        except NotServingError:
            self._spec = None  # look the served model up again next time
            raise
        except (WorkerUnavailableError, AccessDeniedError):
            self._forget()  # reconnect next time (the cluster may have been restarted)
            raise
        out_shape = tuple(spec["output_shape"])
        per_worker = [tuple(wire.array(t, out_shape) for t in reply.shares) for reply in answers]
        return reconstruct_values(per_worker)

    def _fetch_calls(self, query_id, secrets, workers, deadline):
        wait = max(0.0, min(FETCH_WAIT, deadline - time.monotonic()))
        return [self._stubs[i].Fetch.future(wire.M.FetchRequest(
            query_id=query_id, fetch_secret=secrets[i], wait_seconds=wait), timeout=wait + 10.0)
            for i in workers]

    def _fetch(self, query_id, secrets, calls):
        """Each worker's answer shares, asking again while a worker says "not yet"."""
        replies = [None] * 3
        deadline = time.monotonic() + self.timeout
        pending = [0, 1, 2]
        while True:
            asked = time.monotonic()
            got = _gather(calls, [self.cluster.worker_names[i] for i in pending])
            for i, reply in zip(pending, got):
                if reply.ready:
                    replies[i] = reply
            pending = [i for i in range(3) if replies[i] is None]
            if not pending:
                return replies
            if time.monotonic() > deadline:
                raise WorkerUnavailableError(
                    "no answer within {:.0f} s: the workers are overloaded, stuck or "
                    "gone".format(self.timeout))
            if time.monotonic() - asked < 0.05:
                time.sleep(0.05)  # a busy worker answered "not yet" at once: do not spin
            calls = self._fetch_calls(query_id, secrets, pending, deadline)

    def close(self):
        """Forget the served model and the connection (``query()`` reconnects)."""
        self._forget()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(cluster, input_shape, output_shape, timeout=60.0):
    """Connect to the model served on ``cluster``; returns a :class:`Client`.

    Waits up to ``timeout`` seconds for the three workers to answer (WorkerUnavailableError
    otherwise); the served model itself is looked up at the first query.
    """
    return Client(cluster, input_shape, output_shape, timeout=timeout)._open()
