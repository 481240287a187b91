"""The client's side: share inputs locally, reconstruct logits locally.

The client never sends a clear input to any worker: each worker receives only its own
shares, drawn from the OS CSPRNG. The client alone collects all output shares and
reconstructs the logits. It needs TensorFlow for the transport but not TF Encrypted.
"""

import time

import numpy as np

from . import queues
from .backends import LAYOUTS
from .cluster import connect_process, disconnect_process
from .errors import InputError, NotServingError, WorkerUnavailableError
from .serving import ack_handle, peek_spec, queue_names, ready_handles


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
        self._spec = None
        self._handles = None
        self._attach()

    def _attach(self):
        """Connect this process to the cluster and open the ready and ack queues."""
        connect_process(self.cluster, timeout=self.timeout)
        self._ready = ready_handles(self.cluster)
        self._ack = ack_handle(self.cluster)

    def __repr__(self):
        return "<privatekeras.Client input={} output={} cluster={}>".format(
            self.input_shape, self.output_shape, ", ".join(self.cluster.hosts))

    # -- the served model's public spec -------------------------------------------------
    def _served(self):
        try:
            return all(queues.size(d, h) > 0 for d, h in zip(self.devices, self._ready))
        except Exception as exc:  # noqa: BLE001 - any transport failure means unreachable
            raise WorkerUnavailableError(
                "cannot reach the workers {}: {}".format(self.cluster.hosts,
                                                         queues._first_line(exc))) from None

    def _read_spec(self):
        import tensorflow as tf

        deadline = time.monotonic() + self.timeout
        while True:
            if self._served():
                try:
                    return peek_spec(self.devices[0], self._ready[0])
                except tf.errors.OpError:
                    pass  # raced with another reader or with stop(); look again
            if time.monotonic() > deadline:
                raise NotServingError(
                    "no model is being served on cluster {} (waited {:.0f} s): start serving "
                    "with serve() in the model owner's process first".format(
                        self.cluster.hosts, self.timeout))
            time.sleep(0.05)

    def _connect_model(self):
        spec = self._read_spec()
        if tuple(spec["input_shape"][1:]) != self.input_shape[1:] or \
                tuple(spec["output_shape"][1:]) != self.output_shape[1:]:
            raise InputError(
                "the served model takes inputs of shape {} and returns {} (batch first); this "
                "client was connected with input_shape={} and output_shape={}".format(
                    tuple(spec["input_shape"]), tuple(spec["output_shape"]), self.input_shape,
                    self.output_shape))
        layout = LAYOUTS[spec["protocol"]]
        in_name, out_name = queue_names(spec["protocol"], spec["batch_size"],
                                        spec["input_shape"][1:], spec["output_shape"][1:])
        counts = layout.share_counts
        ins = queues.ShareQueues(self.devices, in_name, counts, spec["input_shape"])
        outs = queues.ShareQueues(self.devices, out_name, counts, spec["output_shape"])
        self._spec, self._layout, self._handles = spec, layout, (ins, outs)

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
        if self._ready is None:
            self._attach()  # again, after close()
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
        """Detach this process from the cluster (back to local TensorFlow).

        Call it when done querying: while connected, TensorFlow registers every new
        ``tf.function`` (even a plain ``model.predict``) on the workers, which hangs once the
        model owner has stopped them.
        """
        disconnect_process()
        self._spec = self._handles = self._ready = self._ack = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def predict_proba(self, x):
        """Private prediction followed by a softmax computed here, on the client."""
        return softmax(self.query(x).astype(np.float64)).astype(np.float32)

    def _query_batch(self, xb):
        import tensorflow as tf

        ins, outs = self._handles
        per_worker = self._layout.split(xb)
        if not self._served():
            raise NotServingError("the model is no longer being served on {}".format(
                self.cluster.hosts))
        try:
            ins.put(per_worker)
            self._wait_answer(outs)
            got = [tuple(t.numpy() for t in shares) for shares in outs.take()]
            # The answer is in this process now: let the owner know it may stop.
            queues.enqueue(self.devices[0], self._ack, [tf.constant(1, tf.int64)])
        except tf.errors.OpError as exc:
            raise WorkerUnavailableError("a worker stopped answering during the query: "
                                         "{}".format(queues._first_line(exc))) from None
        return self._layout.reconstruct(got)

    def _wait_answer(self, outs):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                outs.wait(0.5, "the answer")
                return
            except TimeoutError:
                if not self._served():
                    raise NotServingError("the model stopped being served before answering "
                                          "this query") from None
                if time.monotonic() > deadline:
                    raise WorkerUnavailableError(
                        "no answer within {:.0f} s: the model owner or a worker is stuck or "
                        "gone".format(self.timeout)) from None


def connect(cluster, input_shape, output_shape, timeout=60.0):
    """Connect to the model served on ``cluster``; returns a :class:`Client`."""
    return Client(cluster, input_shape, output_shape, timeout=timeout)
