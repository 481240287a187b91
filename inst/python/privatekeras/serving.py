"""The model owner's side: share a Keras model's weights and serve private predictions."""

import json
import os
import socket
import sys
import threading
import time


from . import queues
from .backends import ENGINES, check_protocol
from .cluster import connect_process
from .convert import convert
from .errors import PrivateKerasError, WorkerUnavailableError

READY_QUEUE = "privatekeras/ready"
ACK_QUEUE = "privatekeras/ack"


def _log(msg):
    print("privatekeras: " + msg, file=sys.stderr, flush=True)


def queue_names(protocol, batch_size, input_shape, output_shape):
    """Names of the input and output share queues for one served model signature."""
    sig = "{}/b{}/{}->{}".format(protocol, batch_size, "x".join(map(str, input_shape)),
                                 "x".join(map(str, output_shape)))
    return "privatekeras/in/" + sig, "privatekeras/out/" + sig


def peek_spec(device, ready):
    """The served model's public spec from a ready queue, left in place for others."""
    import tensorflow as tf

    raw = queues.dequeue(device, ready, [tf.string])[0]
    queues.enqueue(device, ready, [raw])
    return json.loads(raw.numpy().decode())


def ack_handle(cluster):
    """Queue on worker 0 where clients acknowledge each answer once it is in their hands."""
    import tensorflow as tf

    return queues.open_queue(cluster.devices[0], ACK_QUEUE, [tf.int64], [[]], 4096)


def ready_handles(cluster):
    import tensorflow as tf

    return [queues.open_queue(d, READY_QUEUE, [tf.string], [[]], 1) for d in cluster.devices]


class SharedModel:
    """A Keras model whose weights are secret-shared on a cluster's three workers.

    Made by :func:`share`; :meth:`serve` answers private queries, :meth:`stop` ends serving.
    The model owner's process keeps the plaintext model; the workers only hold shares.
    """

    def __init__(self, model, cluster, protocol="aby3", batch_size=None):

        self.protocol = check_protocol(protocol)
        self.cluster = cluster
        self.spec = convert(model)
        if batch_size is None:
            batch_size = self.spec.batch_size or 1
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError("batch_size must be a positive integer, got {}".format(batch_size))
        if self.spec.batch_size not in (None, batch_size):
            raise ValueError("the model has a fixed batch size of {}, but batch_size={} was "
                             "asked for".format(self.spec.batch_size, batch_size))
        self.batch_size = batch_size
        self.input_shape = (batch_size,) + tuple(self.spec.input_shape)
        self.output_shape = (batch_size,) + tuple(self.spec.output_shape)

        connect_process(cluster)
        self._engine = ENGINES[self.protocol](cluster)
        self.devices = self._engine.devices
        _log("secret-sharing {} weights of model {!r} onto the workers ...".format(
            sum(len(layer.weights) for layer in self.spec.layers), self.spec.name))
        self._weights = self._engine.private_weights(self.spec.layers)

        in_name, out_name = queue_names(self.protocol, batch_size, self.input_shape[1:],
                                        self.output_shape[1:])
        counts = self._engine.layout.share_counts
        self._in = queues.ShareQueues(self.devices, in_name, counts, self.input_shape)
        self._out = queues.ShareQueues(self.devices, out_name, counts, self.output_shape)
        self._ready = ready_handles(cluster)
        self._ack = ack_handle(cluster)
        self._acked = 0
        self._step = None
        cluster.on_stop(self._release)
        self._stop_event = threading.Event()
        self.served = 0
        self.serving = False

    def __repr__(self):
        return ("<privatekeras.SharedModel {!r} protocol={} input={} output={} {} "
                "served={}>").format(self.spec.name, self.protocol, self.input_shape,
                                     self.output_shape,
                                     "serving" if self.serving else "not serving", self.served)

    @property
    def public_spec(self):
        """What clients may know: shapes, protocol, encoding; nothing about the weights."""
        return {
            "protocol": self.protocol,
            "batch_size": self.batch_size,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "output_activation": self.spec.output_activation,
            "fixed_point": {"base": self._engine.layout.base,
                            "frac_digits": self._engine.layout.frac_digits},
            "owner": {"host": socket.gethostname(), "pid": os.getpid()},
        }

    def _build_step(self):
        import tensorflow as tf

        engine, layers, weights = self._engine, self.spec.layers, self._weights
        ins, outs = self._in, self._out

        @tf.function
        def step():
            engine.fresh_randomness()
            x = engine.wrap_input(ins.take())
            y = engine.forward(layers, weights, x)
            outs.put(engine.unwrap_output(y))

        return step

    def _claim_cluster(self):
        """Publish our spec in the ready queues, unless a live owner already serves here."""
        import tensorflow as tf

        sizes = [queues.size(d, h) for d, h in zip(self.devices, self._ready)]
        if any(sizes):
            owner = peek_spec(self.devices[0], self._ready[0]).get("owner", {})
            alive = owner.get("host") == socket.gethostname() and _pid_alive(owner.get("pid"))
            if alive and owner.get("pid") != os.getpid():
                raise PrivateKerasError(
                    "another model is already being served on this cluster (owner pid {}); "
                    "stop it first".format(owner.get("pid")))
            self._withdraw()
        # Drop answers, queries and acknowledgments left over from an earlier session.
        self._in.drain()
        self._out.drain()
        self._collect_acks()
        self._acked = 0
        spec = tf.constant(json.dumps(self.public_spec))
        for d, h in zip(self.devices, self._ready):
            queues.enqueue(d, h, [spec])

    def _withdraw(self):
        import tensorflow as tf

        for d, h in zip(self.devices, self._ready):
            try:
                queues.drain(d, h, [tf.string])
            except tf.errors.OpError:
                pass  # the worker is gone; nothing to withdraw there

    def _release(self):
        """Drop the traced step while the workers still run, so TF can unregister it."""
        import gc

        self.stop()
        self._step = None
        gc.collect()

    def warm_up(self):
        """Trace the private step once (5-15 s), before any client is let in."""
        if self._step is None:
            t0 = time.monotonic()
            _log("tracing the private model (first time only) ...")
            self._step = self._build_step()
            self._step.get_concrete_function()
            _log("traced in {:.1f} s".format(time.monotonic() - t0))
        return self

    def serve(self, num_requests=None, idle_timeout=None):
        """Answer private queries; blocks until ``num_requests`` are answered or :meth:`stop`.

        Args:
            num_requests: how many queries to answer; None serves until :meth:`stop` is
                called (from another thread) or the process is interrupted.
            idle_timeout: seconds to wait for the next query before giving up and returning
                (None: wait indefinitely).
        Returns:
            the number of queries answered.
        """
        import tensorflow as tf

        if num_requests is not None:
            num_requests = int(num_requests)
            if num_requests < 0:
                raise ValueError("num_requests must be >= 0 or None")
        if idle_timeout is not None and float(idle_timeout) <= 0:
            raise ValueError("idle_timeout must be a positive number of seconds or None")
        self.warm_up()
        self._stop_event.clear()
        try:
            self._claim_cluster()
        except tf.errors.OpError as exc:
            raise WorkerUnavailableError("a worker is not answering: {}".format(
                queues._first_line(exc))) from None
        self.serving = True
        answered = 0
        _log("serving {} ({} requests)".format(
            self.spec.name, "unlimited" if num_requests is None else num_requests))
        try:
            while num_requests is None or answered < num_requests:
                try:
                    got = self._in.wait(idle_timeout, "queries",
                                        should_stop=self._stop_event.is_set)
                except TimeoutError:
                    _log("no query for {:g} s (idle_timeout): stopping after {} "
                         "answers".format(float(idle_timeout), answered))
                    break
                if not got:
                    break
                try:
                    self._step()
                except tf.errors.OpError as exc:
                    raise WorkerUnavailableError(
                        "serving failed, a worker stopped answering: {}".format(
                            queues._first_line(exc))) from None
                answered += 1
                self.served += 1
                self._collect_acks()
                _log("answered request {}{}".format(
                    answered, "" if num_requests is None else "/{}".format(num_requests)))
            self._await_pickup(answered)
        finally:
            self.serving = False
            self._withdraw()
        return answered

    def _collect_acks(self):
        """Take the clients' acknowledgments off worker 0; returns those of this session."""
        import tensorflow as tf

        self._acked += queues.drain(self.devices[0], self._ack, [tf.int64])
        return self._acked

    def _await_pickup(self, answered, timeout=60.0):
        """Wait until clients have acknowledged every answer (they ack once the values are
        in their own process).

        A dequeue runs on the worker and the client fetches the value afterwards; a caller
        that stops the cluster right after serve() (as the tutorial does) would otherwise
        kill the workers under a client still reading its last answer.
        """
        deadline = time.monotonic() + timeout
        while self._collect_acks() < answered:
            if self._stop_event.is_set():
                return
            if time.monotonic() > deadline:
                _log("warning: {:.0f} s passed and a client has not collected its answer; "
                     "returning anyway".format(timeout))
                return
            time.sleep(0.005)

    def stop(self):
        """Stop serving: :meth:`serve` returns after the query in progress."""
        self._stop_event.set()
        if not self.serving:
            self._withdraw()
        return self


def _pid_alive(pid):
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def share(model, cluster, protocol="aby3", batch_size=None):
    """Secret-share a Keras model's weights onto a running cluster.

    Args:
        model: a Keras 3 / tf.keras model (Sequential or a simple functional chain), or the
            path of a ``.keras`` / ``.h5`` file.
        cluster: a started :class:`~privatekeras.Cluster`.
        protocol: ``"aby3"`` (default) or ``"securenn"``.
        batch_size: images per private evaluation; defaults to the model's fixed batch size,
            else 1. Clients may send any number of images: they are padded to whole batches.
    Returns:
        a :class:`SharedModel`; call ``serve()`` on it.
    """
    return SharedModel(model, cluster, protocol=protocol, batch_size=batch_size)


__all__ = ["SharedModel", "share"]
