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
from .layers.activations import apply_final
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


def numeric(x, what="array"):
    """``x`` (a list, numpy or R array, tf.Tensor, ...) as a numeric numpy array, or an
    InputError saying what it is instead."""
    try:
        x = np.asarray(x)
    except Exception:  # noqa: BLE001
        raise InputError("the input must be a numeric {}, got {}".format(
            what, type(x).__name__)) from None
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or
                                   np.issubdtype(x.dtype, np.floating)):
        raise InputError("the input must be a numeric (integer or floating) {}, got dtype "
                         "{}".format(what, x.dtype))
    return x


async def _all(calls, names):
    """Results of asyncio calls to workers, in order; the first failure cancels the others
    and is raised (translated, naming its worker)."""
    import asyncio

    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task, name in zip(tasks, names):
        if task.done() and not task.cancelled() and task.exception() is not None:
            for other in tasks:
                other.cancel()
            raise wire.translate(task.exception(), name) from None
    return [task.result() for task in tasks]


class _Link:
    """This client's asyncio channels to the three workers, served by an event loop on a
    private daemon thread; :meth:`run` runs a coroutine there and waits for its result.
    (Blocking gRPC starts a thread for every concurrent call; this starts none.)"""

    def __init__(self, cluster):
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="privatekeras-client", daemon=True)
        self._thread.start()
        creds = cluster.credentials("client")

        async def open_stubs():
            return [wire.Stub(wire.aio_channel(h, creds, n))
                    for h, n in zip(cluster.hosts, cluster.worker_names)]

        self.stubs = self.run(open_stubs())

    def run(self, coroutine):
        import asyncio

        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller: the calls are cancelled too
            raise

    def close(self):
        async def close_all():
            for stub in self.stubs:
                await stub.close()

        try:
            self.run(close_all())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


class Connection:
    """What a client of either backend does with its servers (``cluster``): reach them, wait
    for a served model, check inputs against the owner's declared range, forget them.
    Subclasses say where they connect (:meth:`_where`) and what to try when nobody answers
    (:meth:`_start_hint`)."""

    def __init__(self, cluster, timeout):
        self.cluster = cluster
        self.timeout = float(timeout)
        self._spec = None
        self._link = None

    def _where(self):
        return "cluster {}".format(self.cluster.hosts)

    def _start_hint(self):
        if getattr(self.cluster, "config", None) is None:
            return ("is the cluster started? The model owner starts it with Cluster.start() / "
                    "pk_start()")
        return ("are the workers running (`privatekeras worker --config ...` on each worker "
                "host)?")

    def _explain(self, exc):
        """The text of a failure to reach the servers."""
        return str(exc)

    def _open(self):
        """Reach the servers, retrying until ``timeout`` (on one machine they may not even be
        started yet: their credentials appear when they are); returns self."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.cluster.status("client", timeout=max(1.0, min(5.0, self.timeout)))
                self._link = _Link(self.cluster)
                return self
            except (WorkerUnavailableError, CredentialsError) as exc:
                self._forget()
                if isinstance(exc, CredentialsError) and \
                        getattr(self.cluster, "config", None) is not None:
                    raise  # a hosts file's credentials do not appear by waiting
                if time.monotonic() > deadline:
                    raise type(exc)("{} (waited {:.0f} s): {}".format(
                        self._explain(exc), self.timeout, self._start_hint())) from None
                time.sleep(0.2)

    def _forget(self):
        """Drop the channels (and the credentials they hold): the next call reloads them, as
        after the owner restarted a cluster with a new throw-away CA."""
        self._spec = None
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self.cluster.forget("client")

    def _serving_board(self):
        """The public board once a model is served, waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + self.timeout
        while True:
            board = self.cluster.status("client", timeout=5.0)[0]
            if board.state == wire.SERVING:
                return board
            if time.monotonic() > deadline:
                raise NotServingError(
                    "no model is being served on {} (waited {:.0f} s): start serving with "
                    "serve() in the model owner's process first".format(
                        self._where(), self.timeout))
            time.sleep(0.05)

    def _check_range(self, x, consequence):
        """Refuse values outside the input range the owner declared (if any)."""
        declared = self._spec.get("input_range")
        if declared is None:
            return
        lo, hi = declared
        if x.min() < lo or x.max() > hi:
            raise InputError(
                "the input's values lie in [{:g}, {:g}], outside the range the model owner "
                "declared for this model, [{:g}, {:g}]: {}".format(
                    x.min(), x.max(), lo, hi, consequence))

    @property
    def output_activation(self):
        """The served model's final activation or inverse link, applied by
        ``predict_proba()`` (None until the first query, or when the model has none)."""
        return None if self._spec is None else self._spec.get("output_activation")

    def close(self):
        """Forget the served model and the connection (``query()`` reconnects)."""
        self._forget()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client(Connection):
    """A connection to the model served on a cluster (made by :func:`connect`).

    Args:
        cluster: a :class:`~privatekeras.Cluster` with the workers' addresses (not started
            by this process).
        input_shape: the shape of one query, batch first, e.g. ``(1, 28, 28, 1)``.
        output_shape: the shape of one answer, batch first, e.g. ``(1, 10)``.
        timeout: seconds to wait for the workers, for a served model, and for each answer.
    """

    def __init__(self, cluster, input_shape, output_shape, timeout=60.0):
        self.input_shape = _as_shape(input_shape, "input_shape")
        self.output_shape = _as_shape(output_shape, "output_shape")
        if self.input_shape[0] != self.output_shape[0]:
            raise InputError("input_shape and output_shape must have the same batch size, got "
                             "{} and {}".format(self.input_shape, self.output_shape))
        super().__init__(cluster, timeout)

    def __repr__(self):
        return "<privatekeras.Client input={} output={} cluster={}>".format(
            self.input_shape, self.output_shape, ", ".join(self.cluster.hosts))

    # -- the workers and the served model ---------------------------------------------------
    def _served_spec(self):
        """The served model's public spec, waiting up to ``timeout`` for serving to begin."""
        board = self._serving_board()
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
        x = numeric(x)
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
        """Private prediction: the model's output before its final activation (logits for
        a softmax or sigmoid model) for ``x`` (batch first), as a numpy array.

        ``x`` may hold any number of rows; they are sent in batches of the served batch size
        (the last one padded with zeros, which are discarded). Values outside the input range
        the owner declared are refused.
        """
        x = self._check_input(x)
        if self._link is None:
            self._open()
        if self._spec is None:
            self._spec = self._served_spec()
        self._check_range(x, "rescale them as the model was trained (values outside it could "
                             "make the private answer wrong)")
        b = self._spec["batch_size"]
        n = x.shape[0]
        pad = (-n) % b
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:])], axis=0)
        outs = [self._query_batch(x[i:i + b]) for i in range(0, x.shape[0], b)]
        return np.concatenate(outs, axis=0)[:n].astype(np.float32)

    def predict_proba(self, x):
        """Private prediction followed by the model's own final activation (softmax,
        sigmoid or none), computed here, on the client: what ``model.predict()`` returns."""
        values = self.query(x)
        return apply_final(self._spec.get("output_activation"), values).astype(np.float32)


    def _query_batch(self, xb):
        spec = self._spec
        shares = share_values(xb)
        query_id = os.urandom(16).hex()
        secrets = [os.urandom(32) for _ in range(3)]
        submits = [wire.M.SubmitRequest(
            query_id=query_id, model_id=spec["model_id"], session=spec["session"],
            shares=[wire.tensor(s) for s in shares[i]], fetch_digest=wire.digest(secrets[i]))
            for i in range(3)]
        try:
            answers = self._link.run(self._exchange(query_id, submits, secrets))
        except NotServingError:
            self._spec = None  # look the served model up again next time
            raise
        except (WorkerUnavailableError, AccessDeniedError):
            self._forget()  # reconnect next time (the cluster may have been restarted)
            raise
        out_shape = tuple(spec["output_shape"])
        per_worker = [tuple(wire.array(t, out_shape) for t in reply.shares) for reply in answers]
        return reconstruct_values(per_worker, frac_bits=spec.get("output_frac_bits"))

    async def _exchange(self, query_id, submits, secrets):
        """Submit to each worker its shares and fetch its answer shares; each Fetch goes
        right behind its Submit (a worker holds a Fetch that overtakes its Submit), so the
        answer costs no extra round trip. Asks again while a worker says "not yet"."""
        import asyncio

        stubs, names = self._link.stubs, self.cluster.worker_names
        deadline = time.monotonic() + self.timeout

        def fetch(i):
            wait = max(0.0, min(FETCH_WAIT, deadline - time.monotonic()))
            return stubs[i].Fetch(wire.M.FetchRequest(query_id=query_id, fetch_secret=secrets[i],
                                                      wait_seconds=wait), timeout=wait + 10.0)

        sent = [stubs[i].Submit(submits[i], timeout=self.timeout) for i in range(3)]
        calls = {i: fetch(i) for i in range(3)}
        try:
            await _all(sent, names)
        except BaseException:
            for call in calls.values():
                call.cancel()
            raise
        replies = [None] * 3
        while True:
            asked = time.monotonic()
            got = await _all(list(calls.values()), [names[i] for i in calls])
            for i, reply in zip(list(calls), got):
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
                await asyncio.sleep(0.05)  # a busy worker said "not yet" at once: no spin
            calls = {i: fetch(i) for i in pending}

def connect(cluster, input_shape=None, output_shape=None, timeout=60.0):
    """Connect to the model served on ``cluster``; returns a :class:`Client`.

    Waits up to ``timeout`` seconds for the three workers to answer (WorkerUnavailableError
    otherwise); the served model itself is looked up at the first query. On a CKKS
    :class:`~privatekeras.Server`, returns a :class:`privatekeras.ckks.client.CKKSClient`
    (shapes optional: the served model's are used).
    """
    if getattr(cluster, "scheme", "aby3") == "ckks":
        from .ckks.client import connect as connect_ckks

        return connect_ckks(cluster, input_shape, output_shape, timeout=timeout)
    return Client(cluster, input_shape, output_shape, timeout=timeout)._open()
