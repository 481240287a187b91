"""The client's side: share inputs locally, reconstruct logits locally.

The client never sends a clear input to any worker: each worker receives only its own
shares, drawn from the OS CSPRNG. The client alone collects all output shares and
reconstructs the logits. It needs TensorFlow for the transport but not TF Encrypted.
"""

import os
import time

import numpy as np

from . import queues
from .backends import LAYOUTS
from .cluster import connect_process, disconnect_process, is_connected
from .errors import InputError, NotServingError, WorkerUnavailableError
from .serving import Board, OwnerWatch, mailbox_name


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


class Client:
    """A connection to a model served on a cluster.

    Args:
        cluster: a :class:`~privatekeras.Cluster` with the workers' addresses (it need not
            be started by this process).
        input_shape: the shape of one query, batch first, e.g. ``(1, 28, 28, 1)``.
        output_shape: the shape of one answer, batch first, e.g. ``(1, 10)``.
        timeout: seconds to wait for a served model, and for each answer.
    """

    def __init__(self, cluster, input_shape, output_shape, timeout=60.0):
        self.cluster = cluster
        self.input_shape = _as_shape(input_shape, "input_shape")
        self.output_shape = _as_shape(output_shape, "output_shape")
        if self.input_shape[0] != self.output_shape[0]:
            raise InputError("input_shape and output_shape must have the same batch size, got "
                             "{} and {}".format(self.input_shape, self.output_shape))
        self.timeout = float(timeout)
        self.devices = cluster.devices
        self.client_id = os.urandom(8).hex()  # names this client's own queues; not secret
        self._spec = None
        self._board = None
        self._attach()

    def _attach(self):
        """Connect this process to the cluster and open the public state on worker 0."""
        connect_process(self.cluster, timeout=self.timeout)
        self._board = Board(self.cluster)

    def __repr__(self):
        return "<privatekeras.Client input={} output={} cluster={}>".format(
            self.input_shape, self.output_shape, ", ".join(self.cluster.hosts))

    # -- the served model's public spec -------------------------------------------------
    def _read_spec(self):
        """The served model's spec, waiting up to ``timeout`` for one to be served."""
        deadline = time.monotonic() + self.timeout
        while True:
            spec = self._call(self._board.spec)
            if spec is not None:
                return spec
            if time.monotonic() > deadline:
                raise NotServingError(
                    "no model is being served on cluster {} (waited {:.0f} s): start serving "
                    "with serve() in the model owner's process first".format(
                        self.cluster.hosts, self.timeout))
            time.sleep(0.05)

    def _call(self, fn, *args):
        """Run a transport call; a worker that does not answer becomes a clear error."""
        import tensorflow as tf

        try:
            return fn(*args)
        except tf.errors.OpError as exc:
            raise WorkerUnavailableError("cannot reach the workers {}: {}".format(
                self.cluster.hosts, queues._first_line(exc))) from None

    def _connect_model(self):
        spec = self._read_spec()
        if tuple(spec["input_shape"][1:]) != self.input_shape[1:] or \
                tuple(spec["output_shape"][1:]) != self.output_shape[1:]:
            raise InputError(
                "the served model takes inputs of shape {} and returns {} (batch first); this "
                "client was connected with input_shape={} and output_shape={}".format(
                    tuple(spec["input_shape"]), tuple(spec["output_shape"]), self.input_shape,
                    self.output_shape))
        # Open (or reopen: handles are names, opening is idempotent) our own queues.
        layout = LAYOUTS[spec["protocol"]]
        self._mailbox = self._call(
            queues.Mailbox, self.devices, mailbox_name(spec["signature"], self.client_id),
            layout.share_counts, spec["input_shape"], spec["output_shape"])
        self._tickets = self._call(self._board.tickets, spec["signature"])
        self._layout, self._spec = layout, spec

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
        return x.astype(np.float64)

    def query(self, x):
        """Private prediction: returns the logits for ``x`` (batch first) as a numpy array.

        ``x`` may hold any number of rows; they are sent in batches of the served batch size
        (the last one padded with zeros, which are discarded).
        """
        x = self._check_input(x)
        if self._board is None or not is_connected(self.cluster):
            self._attach()  # again, after close() or after this process was detached
            self._spec = None
        if self._spec is None:
            self._connect_model()
        layout = self._layout
        # Encode everything first: a bad value fails the query before anything is sent.
        for row in x:
            layout.encode(row)
        b = self._spec["batch_size"]
        n = x.shape[0]
        pad = (-n) % b
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:])], axis=0)
        outs = [self._query_batch(x[i:i + b]) for i in range(0, x.shape[0], b)]
        return np.concatenate(outs, axis=0)[:n].astype(np.float32)

    def close(self):
        """Remove this client's queues from the workers and detach this process from the
        cluster (back to local TensorFlow).

        Call it when done querying: while connected, TensorFlow registers every new
        ``tf.function`` (even a plain ``model.predict``) on the workers, which hangs once the
        model owner has stopped them.
        """
        import tensorflow as tf

        if self._spec is not None:
            try:
                self._mailbox.destroy()
            except tf.errors.OpError:
                pass  # the workers are gone, and the queues with them
        disconnect_process()
        self._spec = self._board = self._mailbox = self._tickets = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def predict_proba(self, x):
        """Private prediction followed by a softmax computed here, on the client."""
        return softmax(self.query(x).astype(np.float64)).astype(np.float32)

    def _query_batch(self, xb):
        """Send one batch's shares to this client's queues, post a ticket, await the answer.

        The ticket (our id, on worker 0) goes out only once every worker holds our shares,
        so the owner's step always finds a complete query in our own queues.
        """
        import tensorflow as tf

        per_worker = self._layout.split(xb)
        watch = OwnerWatch(self._board, self._spec["session"])
        try:
            watch.check(before=True)  # NotServingError when nothing is served any more
            self._mailbox.put_inputs(per_worker)
            queues.enqueue(self.devices[0], self._tickets, [tf.constant(self.client_id)])
            self._wait_answer(watch)
            got = [tuple(t.numpy() for t in shares) for shares in self._mailbox.take_outputs()]
            # The answer is in this process now: let the owner know it may stop.
            self._board.post_ack()
        except tf.errors.OpError as exc:
            raise WorkerUnavailableError("a worker stopped answering during the query: "
                                         "{}".format(queues._first_line(exc))) from None
        except NotServingError:
            self._spec = None  # look the served model up again next time
            raise
        return self._layout.reconstruct(got)

    def _probe_workers(self):
        """One round trip to every worker: a dead one becomes WorkerUnavailableError naming
        it (while waiting, only the first worker's queue is polled)."""
        import tensorflow as tf

        for host, device in zip(self.cluster.hosts, self.devices):
            try:
                queues.ping(device)
            except tf.errors.OpError as exc:
                raise WorkerUnavailableError(
                    "worker {} stopped answering during the query: {}".format(
                        host, queues._first_line(exc))) from None

    def _wait_answer(self, watch):
        start = time.monotonic()
        deadline = start + self.timeout
        while True:
            try:
                self._mailbox.wait_outputs(0.5, "the answer", since=start)
                return
            except TimeoutError:
                self._probe_workers()
                watch.check()
                if time.monotonic() > deadline:
                    raise WorkerUnavailableError(
                        "no answer within {:.0f} s: the model owner or a worker is stuck or "
                        "gone".format(self.timeout)) from None


def connect(cluster, input_shape, output_shape, timeout=60.0):
    """Connect to the model served on ``cluster``; returns a :class:`Client`."""
    return Client(cluster, input_shape, output_shape, timeout=timeout)
