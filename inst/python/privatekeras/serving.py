"""The model owner's side: share a Keras model's weights and serve private predictions."""

import collections
import json
import os
import socket
import sys
import threading
import time

import numpy as np

from . import queues
from .backends import ENGINES, check_protocol
from .cluster import connect_process
from .convert import convert
from .errors import (NotServingError, OwnerUnavailableError, PrivateKerasError,
                     WorkerUnavailableError)

SPEC_VAR = "privatekeras/spec"
BEAT_VAR = "privatekeras/heartbeat"
ACK_QUEUE = "privatekeras/ack"
BEAT_PERIOD = 0.5  # seconds between the serving owner's heartbeats
OWNER_TIMEOUT = 6.0  # a heartbeat older than this means the model owner is gone


def _log(msg):
    print("privatekeras: " + msg, file=sys.stderr, flush=True)


def signature(protocol, batch_size, input_shape, output_shape):
    """The name of one served model signature: protocol, batch size and shapes."""
    return "{}/b{}/{}->{}".format(protocol, batch_size, "x".join(map(str, input_shape)),
                                  "x".join(map(str, output_shape)))


def tickets_name(sig):
    """Queue on worker 0 where clients post their id once their shares are in place."""
    return "privatekeras/tickets/" + sig


def mailbox_name(sig, client_id):
    return "privatekeras/mbox/{}/{}".format(sig, client_id)


PAD_ID = "0" * 16  # the owner's own mailbox of zero queries; never a client's


def valid_client_id(client_id):
    """A client id as clients draw them (16 hex digits), and not the owner's pad id."""
    return (len(client_id) == 16 and all(c in "0123456789abcdef" for c in client_id)
            and client_id != PAD_ID)


class Board:
    """The public control state on worker 0, shared by the model owner and every client.

    - ``spec``: the served model's public spec (JSON) while it is served, else empty;
    - ``heartbeat``: ``"<session>:<count>"``, advanced by the serving owner every
      ``BEAT_PERIOD`` seconds, empty when nothing is served. Clients tell from it that serving
      stopped (empty), restarted (another session) or that the owner died (no change);
    - ``ack``: clients acknowledge each answer once its values are in their own process;
    - ``tickets(sig)``: the queue of client ids with a query waiting, in arrival order.
    """

    def __init__(self, cluster):
        import tensorflow as tf

        self.device = cluster.devices[0]
        self._spec = queues.open_variable(self.device, SPEC_VAR, tf.string)
        self._beat = queues.open_variable(self.device, BEAT_VAR, tf.string)
        self.ack = queues.open_queue(self.device, ACK_QUEUE, [tf.int64], [[]], 4096)
        self._assigned = set()  # variables seen assigned: they stay so (withdraw writes "")

    def _read(self, name, handle):
        import tensorflow as tf

        raw = queues.read_variable(self.device, handle, tf.string, None,
                                   known_initialized=name in self._assigned)
        if raw is None:
            return b""
        self._assigned.add(name)
        return raw

    def spec(self):
        raw = self._read(SPEC_VAR, self._spec)
        return json.loads(raw.decode()) if raw else None

    def heartbeat(self):
        return self._read(BEAT_VAR, self._beat).decode()

    def publish(self, spec):
        import tensorflow as tf

        queues.assign_variable(self.device, self._spec, json.dumps(spec) if spec else "",
                               tf.string)

    def beat(self, value):
        import tensorflow as tf

        queues.assign_variable(self.device, self._beat, value, tf.string)

    def tickets(self, sig):
        import tensorflow as tf

        return queues.open_queue(self.device, tickets_name(sig), [tf.string], [[]], 4096)

    def post_ack(self):
        import tensorflow as tf

        queues.enqueue(self.device, self.ack, [tf.constant(1, tf.int64)])

    def take_acks(self):
        import tensorflow as tf

        return queues.drain(self.device, self.ack, [tf.int64])


class OwnerWatch:
    """A client's view of the owner's heartbeat: raises once serving is over or the owner
    has not beaten for ``OWNER_TIMEOUT`` seconds."""

    def __init__(self, board, session):
        self.board, self.session = board, session
        self.last, self.since = None, time.monotonic()

    def check(self, before=False):
        beat = self.board.heartbeat()
        if not beat and before:
            raise NotServingError("no model is being served any more: the model owner stopped "
                                  "serving (serve() returned or stop() was called)")
        if not beat:
            raise NotServingError("the model stopped being served before answering this query")
        session = beat.split(":")[0]
        if session != self.session:
            raise NotServingError("the model owner restarted serving while this query waited; "
                                  "send it again")
        now = time.monotonic()
        if beat != self.last:
            self.last, self.since = beat, now
        elif now - self.since > OWNER_TIMEOUT:
            raise OwnerUnavailableError(
                "the model owner stopped answering (no heartbeat for {:.0f} s): its process "
                "died or hangs".format(now - self.since))


class _Heartbeat(threading.Thread):
    """The serving owner's pulse on worker 0 (a daemon thread; stops with serve())."""

    def __init__(self, board, session):
        super().__init__(name="privatekeras-heartbeat", daemon=True)
        self.board, self.session = board, session
        self.done = threading.Event()

    def run(self):
        count = 0
        while not self.done.is_set():
            count += 1
            try:
                self.board.beat("{}:{}".format(self.session, count))
            except Exception:  # noqa: BLE001 - worker 0 is gone; serve() reports it
                return
            self.done.wait(BEAT_PERIOD)


class SharedModel:
    """A Keras model whose weights are secret-shared on a cluster's three workers.

    Made by :func:`share`; :meth:`serve` answers private queries, :meth:`stop` ends serving.
    The model owner's process keeps the plaintext model; the workers only hold shares.
    """

    def __init__(self, model, cluster, protocol="aby3", batch_size=None, max_group=1):

        self.protocol = check_protocol(protocol)
        max_group = int(max_group)
        if not 1 <= max_group <= 16:
            raise ValueError("max_group must be an integer in 1..16, got {}".format(max_group))
        self.max_group = max_group
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

        self.signature = signature(self.protocol, batch_size, self.input_shape[1:],
                                   self.output_shape[1:])
        self._board = Board(cluster)
        self._tickets = self._board.tickets(self.signature)
        self._mailboxes = collections.OrderedDict()  # client id -> Mailbox, recent last
        self._session = None
        self._acked = 0
        self._steps = {}  # group size -> traced step, after warm_up()
        self._pad = None  # the owner's own mailbox of zero queries that fill a group
        self.traced = None  # the single-query step's concrete function, after warm_up()
        cluster.on_stop(self._release)
        self._stop_event = threading.Event()
        self.served = 0
        self.serving = False
        self.warm_up()

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
            "signature": self.signature,
            "session": self._session,
            "output_activation": self.spec.output_activation,
            "fixed_point": {"base": self._engine.layout.base,
                            "frac_digits": self._engine.layout.frac_digits},
            "owner": {"host": socket.gethostname(), "pid": os.getpid()},
        }

    def _mailbox(self, client_id):
        """The share queues of one client (opened on its first query, then cached)."""
        if client_id == PAD_ID:
            return self._pad
        box = self._mailboxes.pop(client_id, None)
        if box is None:
            box = self._new_mailbox(client_id)
        self._mailboxes[client_id] = box
        while len(self._mailboxes) > 1024:
            self._mailboxes.popitem(last=False)
        return box

    def _build_step(self, template, group):
        """The traced private evaluation of ``group`` queries at once (batch-concatenated).

        ``template`` gives the queues' devices and shapes; each call passes, per query, the
        handles of the querying client's mailbox, so one trace serves every client. Each
        client's answer shares go back to its own mailbox only.
        """
        import tensorflow as tf

        engine, layers, weights = self._engine, self.spec.layers, self._weights
        in_slots, out_slots = template.inputs, template.outputs
        b, devices = self.batch_size, self.devices

        def on_workers(per_query, fn):
            """Apply ``fn`` to the list over queries of each share, on that share's worker."""
            out = []
            for i, shares in enumerate(zip(*per_query)):
                with tf.device(devices[i]):
                    out.append(tuple(fn(list(s)) for s in zip(*shares)))
            return out

        @tf.function
        def step(in_handles, out_handles):
            """Private evaluation: queries in from the given mailboxes, answers out to them."""
            engine.fresh_randomness()
            per_query = [queues.take([s.with_handle(h) for s, h in zip(in_slots, hs)])
                         for hs in in_handles]
            if group > 1:
                per_query = [on_workers(per_query, lambda s: tf.concat(s, axis=0))]
            y = engine.unwrap_output(engine.forward(layers, weights,
                                                    engine.wrap_input(per_query[0])))
            for k, hs in enumerate(out_handles):
                part = y if group == 1 else on_workers([y], lambda s, k=k: s[0][k * b:(k + 1) * b])
                queues.put([s.with_handle(h) for s, h in zip(out_slots, hs)], part)

        return step

    def _new_mailbox(self, client_id):
        return queues.Mailbox(self.devices, mailbox_name(self.signature, client_id),
                              self._engine.layout.share_counts, self.input_shape,
                              self.output_shape)

    def _complete(self, client_id, grace=2.0):
        """Whether every worker holds this client's shares for its ticket.

        Normally they are there before the ticket. If a client died while sending (its
        requests to the three workers travel separately), wait ``grace`` seconds, then drop
        the incomplete query and its partial shares instead of blocking the step on them.
        """
        box = self._mailbox(client_id)
        deadline = time.monotonic() + grace
        while True:
            sizes = [queues.size(s.device, s.handle) for s in box.inputs]
            if all(sizes):
                return True
            if time.monotonic() > deadline:
                for slot in box.inputs:
                    queues.drain(slot.device, slot.handle, slot.dtypes)
                _log("dropped a query of client {}: its shares did not reach every worker "
                     "(client gone?)".format(client_id))
                return False
            time.sleep(0.01)

    def _run(self, client_ids):
        """Answer the queries waiting in these clients' mailboxes, in one private step; a
        group smaller than ``max_group`` is filled up with queries of zeros."""
        boxes = [self._mailbox(c) for c in client_ids]
        group = 1 if len(boxes) == 1 else self.max_group
        boxes += [self._pad] * (group - len(boxes))
        fill = sum(box is self._pad for box in boxes)
        for _ in range(fill):  # zeros, shared here: public padding, dropped below
            self._pad.put_inputs(self._engine.layout.split(np.zeros(self.input_shape)))
        self._steps[group]([b.handles[0] for b in boxes], [b.handles[1] for b in boxes])
        for _ in range(fill):
            self._pad.take_outputs()

    def _claim_cluster(self):
        """Publish our spec on worker 0, unless a live owner already serves there."""
        current = self._board.spec()
        if current is not None:
            owner = current.get("owner", {})
            if owner.get("pid") != os.getpid() or owner.get("host") != socket.gethostname():
                if self._owner_alive(owner):
                    raise PrivateKerasError(
                        "another model is already being served on this cluster (owner pid {} "
                        "on {}); stop it first".format(owner.get("pid"), owner.get("host")))
        # Drop queries and acknowledgments left over from an earlier session.
        queues.drain(self.devices[0], self._tickets, [_string()])
        self._board.take_acks()
        self._acked = 0
        self._session = os.urandom(8).hex()
        self._board.beat("{}:0".format(self._session))
        self._board.publish(self.public_spec)

    def _owner_alive(self, owner):
        """Whether the owner named in a published spec still serves (pid or heartbeat)."""
        if owner.get("host") == socket.gethostname():
            return _pid_alive(owner.get("pid"))
        first = self._board.heartbeat()
        deadline = time.monotonic() + 3 * BEAT_PERIOD
        while time.monotonic() < deadline:
            time.sleep(BEAT_PERIOD / 2)
            if self._board.heartbeat() != first:
                return True
        return False

    def _withdraw(self):
        """Tell clients nothing is served any more (best effort: the worker may be gone)."""
        import tensorflow as tf

        try:
            current = self._board.spec()
            if current is None or current.get("session") == self._session:
                self._board.beat("")
                self._board.publish(None)
        except tf.errors.OpError:
            pass

    def _release(self):
        """Drop the traced step while the workers still run, so TF can unregister it."""
        import gc

        self.stop()
        if self._pad is not None:
            try:
                self._pad.destroy()
            except Exception:  # noqa: BLE001 - the workers are stopping anyway
                pass
        self._steps, self._pad, self.traced = {}, None, None
        self._mailboxes.clear()
        gc.collect()

    def warm_up(self):
        """Trace the private step and run it once on a query of zeros (5-15 s, first time
        only; twice that with ``max_group`` > 1, which also traces the grouped step), so the
        first client's query costs what every later one does.

        The first run of a traced step registers and instantiates its graph on the three
        workers, which takes seconds; doing it here keeps it out of the first answer.
        """
        if self._steps:
            return self
        t0 = time.monotonic()
        _log("tracing the private model (first time only) ...")
        self._pad = self._new_mailbox(PAD_ID)
        for group in sorted({1, self.max_group}):
            step = self._build_step(self._pad, group)
            concrete = step.get_concrete_function([self._pad.handles[0]] * group,
                                                  [self._pad.handles[1]] * group)
            if group == 1:
                self.traced = concrete
            self._steps[group] = step
            t1 = time.monotonic()
            _log("traced {}in {:.1f} s; first run on the workers ...".format(
                "" if group == 1 else "the step for groups of {} ".format(group), t1 - t0))
            # Shares of zeros, made here: the owner knows this query, nobody else learns.
            self._run([PAD_ID] * group)
            _log("ready in {:.1f} s".format(time.monotonic() - t1))
            t0 = time.monotonic()
        return self

    def serve(self, num_requests=None, idle_timeout=None):
        """Answer private queries; blocks until ``num_requests`` are answered or :meth:`stop`.

        Queries are answered one at a time in arrival order, each from the querying client's
        own queues, so concurrent clients never see each other's answers.

        Args:
            num_requests: how many queries to answer; None serves until :meth:`stop` is
                called (from another thread) or the process is interrupted.
            idle_timeout: seconds to wait for the next query before giving up and returning
                (None: wait indefinitely).
        Returns:
            the number of queries answered.
        Raises:
            WorkerUnavailableError: a worker stopped answering (serving ends).
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
        heartbeat = _Heartbeat(self._board, self._session)
        heartbeat.start()
        self.serving = True
        answered = 0
        _log("serving {} ({} requests)".format(
            self.spec.name, "unlimited" if num_requests is None else num_requests))
        try:
            while num_requests is None or answered < num_requests:
                limit = self.max_group if num_requests is None else min(
                    self.max_group, num_requests - answered)
                try:
                    client_ids = self._next_tickets(idle_timeout, answered, limit)
                    if not client_ids:
                        break
                    self._run(client_ids)
                except tf.errors.OpError as exc:
                    raise WorkerUnavailableError(
                        "serving failed, a worker stopped answering: {}".format(
                            queues._first_line(exc))) from None
                answered += len(client_ids)
                self.served += len(client_ids)
                _log("answered request{} {}{}".format(
                    "s" if len(client_ids) > 1 else "",
                    answered if len(client_ids) == 1 else "{}-{}".format(
                        answered - len(client_ids) + 1, answered),
                    "" if num_requests is None else "/{}".format(num_requests)))
            self._await_pickup(answered)
        finally:
            heartbeat.done.set()
            self.serving = False
            self._withdraw()
        return answered

    def _next_tickets(self, idle_timeout, answered, limit):
        """Ids of the next clients with a query waiting (at most ``limit``, in arrival order);
        an empty list to stop serving."""
        import tensorflow as tf

        start = time.monotonic()
        while True:
            try:
                got = queues.wait_until_nonempty([self.devices[0]], [self._tickets], 0.5,
                                                 "queries", max_delay=0.001, since=start,
                                                 should_stop=self._stop_event.is_set)
            except TimeoutError:
                # Idle: make sure every worker is still there, so a dead one ends serve()
                # now rather than at the next query.
                for device in self.devices:
                    queues.ping(device)
                if idle_timeout is not None and time.monotonic() - start > idle_timeout:
                    _log("no query for {:g} s (idle_timeout): stopping after {} "
                         "answers".format(float(idle_timeout), answered))
                    return []
                continue
            if not got:
                return []
            n = 1 if limit == 1 else min(limit, queues.size(self.devices[0], self._tickets))
            with tf.device(self.devices[0]):
                raw = tf.raw_ops.QueueDequeueManyV2(handle=self._tickets, n=n,
                                                    component_types=[tf.string])[0]
            ids = [r.decode(errors="replace") for r in raw.numpy()]
            for bad in [i for i in ids if not valid_client_id(i)]:
                _log("ignored a malformed ticket {!r}".format(bad[:40]))
            ids = [i for i in ids if valid_client_id(i) and self._complete(i)]
            if ids:
                return ids

    def _collect_acks(self):
        """Take the clients' acknowledgments off worker 0; returns those of this session."""
        self._acked += self._board.take_acks()
        return self._acked

    def _await_pickup(self, answered, patience=10.0):
        """Wait until clients have acknowledged every answer (they ack once the values are
        in their own process).

        A dequeue runs on the worker and the client fetches the value afterwards; a caller
        that stops the cluster right after serve() (as the tutorial does) would otherwise
        kill the workers under a client still reading its last answer. A client that died
        never acknowledges: after ``patience`` seconds without progress, give up.
        """
        last, since = self._collect_acks(), time.monotonic()
        while last < answered:
            if self._stop_event.is_set():
                return
            if time.monotonic() - since > patience:
                _log("warning: {} answer(s) not collected by their clients after {:.0f} s; "
                     "returning anyway".format(answered - last, patience))
                return
            time.sleep(0.005)
            now = self._collect_acks()
            if now != last:
                last, since = now, time.monotonic()

    def stop(self):
        """Stop serving: :meth:`serve` returns after the query in progress."""
        self._stop_event.set()
        if not self.serving:
            self._withdraw()
        return self


def _string():
    import tensorflow as tf

    return tf.string


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


def share(model, cluster, protocol="aby3", batch_size=None, max_group=1):
    """Secret-share a Keras model's weights onto a running cluster.

    Args:
        model: a Keras 3 / tf.keras model (Sequential or a simple functional chain), or the
            path of a ``.keras`` / ``.h5`` file.
        cluster: a started :class:`~privatekeras.Cluster`.
        protocol: ``"aby3"`` (default) or ``"securenn"``.
        batch_size: images per private evaluation; defaults to the model's fixed batch size,
            else 1. Clients may send any number of images: they are padded to whole batches.
        max_group: when several clients' queries are waiting, evaluate up to this many in one
            private step (their batches concatenated; each answer still goes only to its
            client). Raises throughput under concurrent load; costs a second trace in
            :meth:`SharedModel.warm_up`. 1 (default) evaluates one query at a time.
    Returns:
        a :class:`SharedModel`, its private step already traced and run once (see
        :meth:`SharedModel.warm_up`), so ``serve()`` answers its first query at full speed.
    """
    return SharedModel(model, cluster, protocol=protocol, batch_size=batch_size,
                       max_group=max_group)


__all__ = ["SharedModel", "share"]
