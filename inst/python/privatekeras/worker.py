"""A worker: one of the three parties that hold shares and compute.

Each worker process runs two servers and one set of links:

* its **API** (gRPC, mutual TLS; methods in :mod:`privatekeras.wire`), the only thing owners
  and clients can reach: the owner uploads this worker's weight shares, clients submit their
  input shares and fetch their answer shares;
* its **TensorFlow server** on the compute port, reachable only by the other two workers
  (loopback on one machine, stunnel links across hosts);
* its **mesh links** to the other two workers (:mod:`privatekeras.deploy.mesh`, mutually
  authenticated with the workers' certificates), over which the step's protocol messages and
  the workers' notes go.

Each worker traces the private step itself from the model's public spec and runs only its own
part of it (:mod:`privatekeras.mpc.partition`), in its own process: the weight shares come
from its own TensorFlow variables (:mod:`privatekeras.mpc.store`), the input shares it holds
for a query are fed to its part, the answer shares come back to it. Worker 0 also keeps the
public board (served model, serving state) and decides which queries form the next step: a
query is evaluated only when all three workers hold its shares (workers 1 and 2 note each
arrival), and each step starts with worker 0's "go" note naming the step's id and queries.
A client fetches each worker's answer shares with the secret whose digest it sent that worker
with its shares; a worker never sees another worker's secret.
"""

import collections
import concurrent.futures
import json
import os
import queue
import re
import threading
import time

import grpc
import numpy as np

from . import wire
from .errors import PrivateKerasError
from .log import say, warn
from .wire import M, Refusal

QUERY_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_ID = re.compile(r"^[0-9a-f]{16,64}$")
MAX_WAITING = 4096  # queries a worker holds at once
QUERY_TTL = 300.0  # seconds before an unevaluated or unfetched query is dropped
MAX_FETCH_WAIT = 10.0  # longest a Fetch call waits for its answer before saying "not yet"
SUBMIT_GRACE = 2.0  # how long a Fetch waits for its query's Submit to arrive
API_THREADS = 128  # threads of a worker's API server
LONG_POLLS = 96  # Fetch calls that may wait at once (the other threads stay free)
IDLE_CHECK = 0.5  # while serving and idle, worker 0 checks the other workers this often
PICKUP_PATIENCE = 10.0  # serve() waits this long without progress for answers to be fetched
PICKUP_POLL = 0.05  # meanwhile it asks workers 1 and 2 this often how many they still hold
PEER_TIMEOUT = 5.0
TRACE_TIMEOUT = 900.0  # how long worker 0 waits for workers 1 and 2 to trace their parts
PAD = ""  # never a client's query id: pads a group; its input and answer are zeros


class Query:
    """One client query as this worker holds it."""

    __slots__ = ("id", "digest", "born", "output", "error", "ready", "session")

    def __init__(self, query_id, digest, session):
        self.id, self.digest, self.session = query_id, digest, session
        self.born = time.monotonic()
        self.output = None  # this worker's answer pair, once evaluated
        self.error = None  # (kind, message) when it will never be evaluated
        self.ready = threading.Event()


class Model:
    """The uploaded model as this worker knows it: the public spec, its weight shares'
    resources, and the input shares of the queries not yet evaluated."""

    def __init__(self, spec, local_store):
        self.spec, self.store = spec, local_store
        self.id = spec["model_id"]
        self.in_shape = tuple(spec["input_shape"])
        self.out_shape = tuple(spec["output_shape"])
        self.inputs = {}  # query id -> this worker's input row (its pair of shares, flat)
        self.steps = None  # group size -> the traced step (privatekeras.mpc.aby3.Step)

    def drop(self, ids):
        """Forget these queries' inputs (expired)."""
        for qid in ids:
            self.inputs.pop(qid, None)

    def take_inputs(self, ids, width):
        """The input rows of the queries ``ids`` (zeros for a pad or a forgotten query),
        removed."""
        rows = np.zeros([len(ids), width], np.int64)
        for k, qid in enumerate(ids):
            row = self.inputs.pop(qid, None)
            if row is not None:
                rows[k] = row
        return rows

    def client_spec(self):
        """What clients are told: shapes, protocol, encoding; not the architecture."""
        keep = ("model_id", "name", "protocol", "batch_size", "input_shape", "output_shape",
                "output_activation", "input_range", "fixed_point", "output_frac_bits")
        return {k: self.spec[k] for k in keep if k in self.spec}


class WorkerConfig:
    """Where worker ``index`` listens and who its peers are.

    Args:
        index: 0, 1 or 2.
        names: the three workers' names (their certificates' CNs).
        api: the three workers' API addresses, as the other parties reach them.
        api_listen: what this worker's API server binds (default: its ``api`` address).
        compute: the three workers' TensorFlow addresses as the workers reach them.
        compute_port: the port this worker's TensorFlow server binds on 127.0.0.1 (default:
            the port of its ``compute`` address).
        mesh: the three workers' mesh addresses as the workers reach them (the links that
            carry the protocol's messages, :mod:`privatekeras.deploy.mesh`); default: each
            compute address's port + 1.
        mesh_port: the port this worker's mesh listens on, on 127.0.0.1 (default: the port
            of its ``mesh`` address).
        credentials: this worker's TLS credentials (privatekeras.deploy.pki.Credentials).
        job: the TensorFlow job name.
    """

    def __init__(self, index, names, api, compute, credentials, api_listen=None,
                 compute_port=None, mesh=None, mesh_port=None, job="pk"):
        from .deploy.mesh import default_address

        self.index, self.names, self.api, self.compute = index, list(names), list(api), list(
            compute)
        self.credentials, self.job = credentials, job
        self.api_listen = api_listen or self.api[index]
        self.compute_port = compute_port or int(self.compute[index].rpartition(":")[2])
        self.mesh = list(mesh) if mesh else [default_address(c) for c in self.compute]
        self.mesh_port = mesh_port or int(self.mesh[index].rpartition(":")[2])

    @property
    def confined_ports(self):
        """The ports that must listen on loopback only: TensorFlow's and the mesh's."""
        return [self.compute_port, self.mesh_port]

    @property
    def name(self):
        return self.names[self.index]

    @property
    def devices(self):
        return ["/job:{}/replica:0/task:{}/device:CPU:0".format(self.job, i) for i in range(3)]


class WorkerServer:
    """One worker's API server and its part of the computation. Cheap to construct;
    :meth:`start` joins the compute cluster and opens the API."""

    PEERS = (1, 2)  # worker 0's peers: told about steps, checked while idle, asked about pickups

    def __init__(self, config):
        self.config = config
        self.index = config.index
        # One lock for all of this worker's state; two conditions on it, so that what wakes
        # one kind of waiter does not wake the other: _cv for fetches and pickup (a query
        # registered, fetched or failed), _work for worker 0's serving loop (a query ready,
        # serving ended).
        lock = threading.RLock()
        self._cv = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._model = None
        self._queries = {}  # query id -> Query
        self._state = wire.EMPTY
        self._message = "no model uploaded"
        self._server = None
        self._mesh = None
        self._peers = {}  # index -> wire.Stub, made on first use
        self._peers_lock = threading.Lock()
        self._long_polls = threading.BoundedSemaphore(LONG_POLLS)
        self._closing = threading.Event()
        self._sending = collections.Counter()  # session -> answer shares being sent by Fetch
        self._engine = None
        self._steps = {}  # worker 0: group size -> traced step, once prepared
        self._trace_lock = threading.Lock()
        self._gos = queue.Queue()  # workers 1 and 2: worker 0's "go" notes, in order
        # worker 0 only
        self._step_ids = None
        self._arrivals = {}  # query id -> (set of worker indices holding its shares, since)
        self._ready = collections.deque()  # query ids complete on every worker, in order
        self._session = ""  # workers 1 and 2: the session of worker 0's last "go" note
        self._answered = 0  # in the current or last serving session
        self._failure = None  # (kind, message) when the last serving session failed
        self._stop_serving = threading.Event()

    # -- life cycle ------------------------------------------------------------------------
    def start(self):
        """Start the mesh and this worker's TensorFlow server, open the API, and (worker 0)
        wait for the other two workers' APIs. Returns self."""
        from .deploy.mesh import Mesh
        from .kernels import loader
        from .mpc.tfe_compat import import_tfe

        loader.load()  # our CSPRNG kernels run here: without them, refuse to start
        cfg = self.config
        self._mesh = Mesh(self.index, cfg.names, cfg.mesh, cfg.mesh_port,
                          cfg.credentials, on_note=self._on_note).start()
        import_tfe()  # before joining: TF Encrypted builds a default protocol on import
        self._join_compute()
        if self.index != 0:
            threading.Thread(target=self._run_gos, name="privatekeras-steps",
                             daemon=True).start()
        self._open_api()
        if self.index == 0:
            self._await_peers()
        threading.Thread(target=self._janitor, name="privatekeras-janitor", daemon=True).start()
        return self

    def _join_compute(self):
        """Start this worker's TensorFlow server, a cluster of its own task only: its device
        is then named as the traced step names it (``/job:pk/replica:0/task:<index>``). No
        worker connects to another's server: an eager context that did would copy every
        function it makes (the whole traced step) to the others' servers."""
        import tensorflow as tf
        from tensorflow.core.protobuf import tensorflow_server_pb2
        from tensorflow.python.eager import context

        cfg = self.config
        tasks = {self.index: "127.0.0.1:{}".format(cfg.compute_port)}
        cluster = tf.train.ClusterSpec({cfg.job: tasks}).as_cluster_def()
        server_def = tensorflow_server_pb2.ServerDef(
            cluster=cluster, job_name=cfg.job, task_index=self.index, protocol="grpc",
            port=cfg.compute_port, default_session_config=context.context().config)
        context.set_server_def(server_def)
        tf.config.list_logical_devices()  # starts the server (and worker 0's remote contexts)
        say("%s: TensorFlow server on 127.0.0.1:%d (workers only)", cfg.name, cfg.compute_port)

    def _open_api(self):
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(
            max_workers=API_THREADS, thread_name_prefix="privatekeras-api"),
            options=wire.SERVER_OPTIONS, maximum_concurrent_rpcs=4 * API_THREADS)
        self._server.add_generic_rpc_handlers((wire.handlers(self),))
        bound = self._server.add_secure_port(self.config.api_listen,
                                             wire.server_credentials(self.config.credentials))
        if not bound:
            raise PrivateKerasError("worker {}: cannot listen on {} (port in use?)".format(
                self.config.name, self.config.api_listen))
        self._server.start()
        say("%s: API (mutual TLS) on %s", self.config.name, self.config.api_listen)

    def _await_peers(self):
        """Worker 0 waits until workers 1 and 2 answer on their APIs (so that it reports
        ready only when the cluster is)."""
        last = 0.0
        for i in self.PEERS:
            while True:
                try:
                    self._peer(i).Status(M.Empty(), timeout=PEER_TIMEOUT)
                    break
                except grpc.RpcError as exc:
                    if time.monotonic() - last > 5:
                        say("%s: waiting for %s (%s) ...", self.config.name,
                            self.config.names[i], wire.translate(exc, self.config.names[i]))
                        last = time.monotonic()
                    if self._closing.wait(0.2):
                        return

    def wait(self):
        """Block until the API server ends."""
        self._server.wait_for_termination()

    def stop(self, grace=1.0):
        self._closing.set()
        self._gos.put(None)
        if self._server is not None:
            self._server.stop(grace)
        if self._mesh is not None:
            self._mesh.close()

    def _peer(self, i):
        """The API of worker ``i``, called as a worker (one channel per peer)."""
        with self._peers_lock:
            stub = self._peers.get(i)
            if stub is None:
                cfg = self.config
                stub = wire.Stub(wire.channel(cfg.api[i], cfg.credentials, cfg.names[i]))
                self._peers[i] = stub
            return stub

    def _check_peer_index(self, peer, index, method):
        if not 0 <= index < 3 or peer[0] != self.config.names[index]:
            raise Refusal("Denied", "{}: {!r} is not worker {}".format(method, peer[0], index))

    def _only_worker0(self, method):
        if self.index != 0:
            raise Refusal("Failed", "{} goes to worker 0 ({}), not to {}".format(
                method, self.config.names[0], self.config.name))

    # -- the public board --------------------------------------------------------------------
    def Status(self, request, context, peer):
        with self._cv:
            model = self._model
            spec = "" if model is None else json.dumps(
                model.client_spec() if peer[1] == "client" else model.spec)
            unfetched = self._unfetched(self._session) if peer[1] == "worker" else 0
            return M.Board(worker=self.config.name, index=self.index, state=self._state,
                           session=self._session, answered=self._answered,
                           message=self._message, model_id=model.id if model else "",
                           spec_json=spec, unfetched=unfetched)

    # -- the owner's calls -----------------------------------------------------------------
    @staticmethod
    def _read_upload(chunks, parse):
        """The (spec, tensors) of an Upload stream: one spec (checked by ``parse``) first,
        then the tensors."""
        spec, tensors = None, []
        for chunk in chunks:
            if chunk.spec_json:
                if spec is not None:
                    raise Refusal("BadInput", "an upload carries one model spec")
                spec = parse(chunk.spec_json)
            tensors.extend(chunk.weights)
        if spec is None:
            raise Refusal("BadInput", "the upload carried no model spec")
        return spec, tensors

    def Upload(self, chunks, context, peer):
        spec, tensors = self._read_upload(chunks, _parse_spec)
        shapes = [tuple(s) for node in spec["nodes"] for s in node["weight_shapes"]]
        from .mpc import store

        if len(tensors) != store.SHARES * len(shapes):
            raise Refusal("BadInput", "expected {} weight shares ({} per weight), got {}".format(
                store.SHARES * len(shapes), store.SHARES, len(tensors)))
        try:
            pairs = [[wire.array(tensors[store.SHARES * k + j], shape)
                      for j in range(store.SHARES)] for k, shape in enumerate(shapes)]
        except PrivateKerasError as exc:
            raise Refusal("BadInput", str(exc)) from None
        with self._cv:
            if self._state == wire.SERVING:
                raise Refusal("Busy", "a model is being served on this cluster: stop serving "
                                      "before uploading another")
            old, self._model = self._model, None
            self._state, self._message = wire.EMPTY, "receiving a model"
            self._fail_all("NotServing", "the model owner uploaded another model")
        if old is not None:
            old.store.destroy()
        local = store.LocalStore(self.config.devices[self.index], spec["model_id"], shapes)
        local.put_weights(pairs)
        with self._cv:
            self._model = Model(spec, local)
            self._steps = {}
            self._state, self._message = wire.LOADED, "model {!r} uploaded".format(spec["name"])
        say("%s: holds its shares of model %r (%s) from %s", self.config.name, spec["name"],
            spec["model_id"], peer[0])
        return self.Status(None, context, peer)

    def Prepare(self, request, context, peer):
        self._only_worker0("Prepare")
        model = self._model
        if model is None or model.id != request.model_id:
            raise Refusal("Failed", "worker 0 does not hold model {}: upload it first".format(
                request.model_id))
        for i in self.PEERS:
            try:
                board = self._peer(i).Status(M.Empty(), timeout=PEER_TIMEOUT)
            except grpc.RpcError as exc:
                raise Refusal("WorkerLost", str(wire.translate(exc, self.config.names[i])))
            if board.model_id != model.id:
                raise Refusal("Failed", "{} holds model {!r}, not {}: upload to all three "
                              "workers".format(self.config.names[i], board.model_id, model.id))
        from .mpc.aby3 import StepIds

        t0 = time.monotonic()
        yield M.Progress(message="each worker traces its part of the private model (first "
                                 "time only) ...")
        traces = [self._peer(i).Trace.future(M.PrepareRequest(model_id=model.id),
                                             timeout=TRACE_TIMEOUT) for i in self.PEERS]
        steps = self._trace(model)
        plans = [steps[g].plan() for g in sorted(steps)]
        for i, trace in zip(self.PEERS, traces):
            try:
                theirs = list(trace.result().plans)
            except grpc.RpcError as exc:
                raise Refusal("WorkerLost", "{} could not trace its part: {}".format(
                    self.config.names[i], wire.translate(exc, self.config.names[i])))
            if theirs != plans:
                raise Refusal("Failed", "{} traced a step whose messages differ from worker "
                              "0's: the workers run different privatekeras versions".format(
                                  self.config.names[i]))
        t1 = time.monotonic()
        yield M.Progress(message="traced in {:.1f} s; first run on the workers ...".format(
            t1 - t0), seconds=t1 - t0)
        if self._step_ids is None:
            self._step_ids = StepIds()
        for group in sorted(steps):  # shares of zeros: public padding
            self._run_step(model, steps[group], [PAD] * group, "")
        t0 = time.monotonic()
        yield M.Progress(message="ready in {:.1f} s".format(t0 - t1), seconds=t0 - t1)
        with self._cv:
            if self._model is model:
                self._steps = steps
                self._state, self._message = wire.READY, "model {!r} ready".format(
                    model.spec["name"])
        yield M.Progress(message="ready", done=True)

    def _trace(self, model):
        """This worker's traced steps for ``model``, one per group size (kept for the
        model: tracing takes seconds)."""
        from .mpc.aby3 import ABY3Engine

        with self._trace_lock:
            if model.steps is None:
                if self._engine is None:
                    self._engine = ABY3Engine(self.config.devices, self.config.compute,
                                              self.config.job)
                steps = {}
                for group in sorted({1, int(model.spec.get("max_group", 1))}):
                    steps[group] = self._engine.build_step(model.spec, group)
                    steps[group].part(self.index)
                model.steps = steps
            return model.steps

    def Trace(self, request, context, peer):
        """(Workers 1 and 2, from worker 0.) Trace this worker's parts of the step."""
        if self.index == 0:
            raise Refusal("Failed", "Trace goes to workers 1 and 2")
        self._check_peer_index(peer, 0, "Trace")
        model = self._model
        if model is None or model.id != request.model_id:
            raise Refusal("Failed", "{} does not hold model {}: upload it to all three "
                          "workers".format(self.config.name, request.model_id))
        steps = self._trace(model)
        return M.TraceReply(plans=[steps[g].plan() for g in sorted(steps)])

    def StopServing(self, request, context, peer):
        self._only_worker0("StopServing")
        self._end_serving(self._session, "NotServing",
                          "no model is being served any more: the model owner stopped serving")
        return self.Status(None, context, peer)

    def Serve(self, request, context, peer):
        self._only_worker0("Serve")
        with self._cv:
            if self._state == wire.SERVING:
                raise Refusal("Busy", "the model is already being served (another serve() "
                                      "call); stop it first")
            if self._state == "failed":
                raise Refusal("WorkerLost", "{}; restart the cluster".format(self._message))
            if self._state != wire.READY:
                raise Refusal("NotServing", "no prepared model to serve: share() it first")
            session = os.urandom(8).hex()
            self._session, self._state, self._answered = session, wire.SERVING, 0
            self._message, self._failure = "serving", None
            self._stop_serving = stop = threading.Event()
            max_group = max(self._steps)
        context.add_callback(lambda: self._end_serving(
            session, "OwnerGone", "the model owner stopped serving without withdrawing (its "
                                  "process ended or lost its connection)"))
        limit = None if request.unlimited else int(request.num_requests)
        idle = request.idle_timeout if request.idle_timeout > 0 else None
        say("%s: serving model %r (%s requests), session %s", self.config.name,
            self._model.spec["name"], "unlimited" if limit is None else limit, session)
        yield M.ServeEvent(session=session, message="serving")
        answered = 0
        try:
            while limit is None or answered < limit:
                ids = self._next_group(stop, max_group if limit is None else min(
                    max_group, limit - answered), idle)
                if not ids:
                    self._raise_failure(session)
                    break
                seconds = self._evaluate(ids, session)
                answered += len(ids)
                yield M.ServeEvent(answered=answered, session=session, step_seconds=seconds)
            self._await_pickup(stop, session)
        except Refusal as refusal:
            self._end_serving(session, refusal.kind, refusal.message, failed=True)
            raise
        finally:
            self._end_serving(session, "NotServing", "the model stopped being served")
        yield M.ServeEvent(answered=answered, session=session, message="stopped")

    def _raise_failure(self, session):
        """Raise the Refusal that ended serving session ``session``, if it failed (a worker
        lost while waiting for queries)."""
        with self._cv:
            failure = self._failure if self._session == session else None
        if failure is not None:
            raise Refusal(*failure)

    def _end_serving(self, session, kind, message, failed=False):
        """End the serving session ``session`` (if it is still the current one): queries
        not yet answered fail with ``kind``."""
        with self._cv:
            if self._session != session or self._state != wire.SERVING:
                return
            self._state = "failed" if failed else wire.READY
            self._message = message
            self._failure = (kind, message) if failed else None
            self._stop_serving.set()
            self._fail_all(kind, message)
            self._cv.notify_all()
            self._work.notify_all()
        if kind != "NotServing" or failed:
            warn("%s: serving ended: %s", self.config.name, message)

    def _fail_all(self, kind, message):
        """(Under the lock.) Every query not yet evaluated fails with ``kind``."""
        for query in self._queries.values():
            if query.output is None and query.error is None:
                query.error = (kind, message)
                query.ready.set()
        self._arrivals.clear()
        self._ready.clear()

    def _next_group(self, stop, limit, idle_timeout):
        """Ids of up to ``limit`` queries whose shares every worker holds, in arrival order;
        None when serving ends. While idle, checks the other workers every IDLE_CHECK s, by
        the clock: a wake-up that brings no ready query costs no check."""
        since = checked = time.monotonic()
        while True:
            with self._cv:
                while not self._ready and not stop.is_set():
                    left = checked + IDLE_CHECK - time.monotonic()
                    if left <= 0:
                        break
                    self._work.wait(left)
                if stop.is_set():
                    return None
                if self._ready:
                    return [self._ready.popleft() for _ in range(min(limit, len(self._ready)))]
            self._check_peers()
            checked = time.monotonic()
            if idle_timeout is not None and checked - since > idle_timeout:
                say("%s: no query for %g s (idle_timeout): serving ends", self.config.name,
                    idle_timeout)
                return None

    def _check_peers(self):
        for i in self.PEERS:
            try:
                self._peer(i).Status(M.Empty(), timeout=PEER_TIMEOUT)
            except grpc.RpcError as exc:
                raise Refusal("WorkerLost", "serving failed: {}".format(
                    wire.translate(exc, self.config.names[i]))) from None

    def _evaluate(self, ids, session):
        """Run the private step on these queries (workers 1 and 2 run theirs on worker 0's
        "go"); returns the step's own run time on this worker in seconds (public: clients see
        their latency anyway)."""
        group = 1 if len(ids) == 1 else max(self._steps)
        seconds = self._run_step(self._model, self._steps[group],
                                 ids + [PAD] * (group - len(ids)), session)
        with self._cv:
            self._answered += len(ids)
        return seconds

    def _run_step(self, model, step, ids, session):
        """(Worker 0.) Tell workers 1 and 2 to run the step on the queries ``ids`` (a full
        group, padded) under a fresh step id, run this worker's part, and hand out its
        answers. Returns the seconds this worker's part took."""
        import tensorflow as tf

        from .errors import ClusterError

        step_id = self._step_ids.next()
        for i in self.PEERS:
            try:
                self._mesh.note(i, go=step_id, session=session, model=model.id, ids=ids)
            except ClusterError as exc:
                raise Refusal("WorkerLost", "serving failed: {}".format(exc)) from None
        t0 = time.perf_counter()
        try:
            answers = self._run_part(model, step, step_id, ids)
        except tf.errors.OpError as exc:
            self._check_peers()
            raise Refusal("WorkerLost", "serving failed, a worker stopped answering: {}".format(
                _first_line(exc))) from None
        seconds = time.perf_counter() - t0
        self._deliver(model, ids, answers)
        return seconds

    def _run_part(self, model, step, step_id, ids):
        """Run this worker's part of ``step`` under ``step_id`` on the queries ``ids`` (their
        input shares taken out of ``model``); returns this worker's answer rows."""
        part = step.part(self.index)
        with self._cv:
            rows = model.take_inputs(ids, part.in_width)
        return part(step_id, rows)

    def _deliver(self, model, ids, answers):
        """Hand each evaluated query its answer shares (``answers``: this worker's answer
        rows, in the order of ``ids``) and release the clients' fetches."""
        from .mpc.store import SHARES

        with self._cv:
            for qid, row in zip(ids, answers):
                query = self._queries.get(qid) if qid != PAD else None
                if query is None:  # a pad, or expired meanwhile: nobody will fetch it
                    continue
                query.output = [part.reshape(model.out_shape) for part in np.split(row, SHARES)]
                query.ready.set()
            self._cv.notify_all()

    def _await_pickup(self, stop, session):
        """Wait until every answer of this session was fetched from all three workers (a
        caller that stops the cluster right after serve() must not cut a client off its last
        answer); give up after PICKUP_PATIENCE s without progress.

        Workers 1 and 2 are asked here, at the end, how many they still hold (their board,
        every PICKUP_POLL s), rather than reporting every delivered answer as it goes: a note
        per answer per worker is two more calls per query, competing with the next query."""
        last, since = None, time.monotonic()
        while not stop.is_set():
            left = sum(self._unfetched_on(i, session) for i in self.PEERS)
            with self._cv:
                left += self._unfetched(session)
                if left == 0 or stop.is_set():
                    return
                if left != last:
                    last, since = left, time.monotonic()
                elif time.monotonic() - since > PICKUP_PATIENCE:
                    warn("%s: %d answer share(s) not fetched by their clients after %.0f s",
                         self.config.name, left, PICKUP_PATIENCE)
                    return
                self._cv.wait(PICKUP_POLL)  # woken early by a fetch from this worker

    def _unfetched_on(self, i, session):
        """How many answer shares of ``session`` worker ``i`` still holds (0 when it cannot
        be reached: nobody can fetch them then)."""
        try:
            board = self._peer(i).Status(M.Empty(), timeout=PEER_TIMEOUT)
        except grpc.RpcError as exc:
            warn("%s: cannot ask %s whether its answers were fetched: %s", self.config.name,
                 self.config.names[i], wire.translate(exc, self.config.names[i]))
            return 0
        return board.unfetched if board.session == session else 0

    def _unfetched(self, session):
        """(Under the lock.) Answer shares of serving session ``session`` that this worker
        holds for their clients: evaluated and not yet fetched, or being sent."""
        return self._sending[session] + sum(
            1 for q in self._queries.values() if q.session == session and q.output is not None)

    # -- the clients' calls ----------------------------------------------------------------
    def _submitted_model(self, request):
        """The served model a Submit is for, after checking its query id and fetch digest."""
        model = self._model
        if model is None:
            raise Refusal("NotServing", "no model is being served here")
        if request.model_id != model.id:
            raise Refusal("NotServing", "the model owner has replaced the served model; "
                                        "query again")
        if not QUERY_ID.match(request.query_id):
            raise Refusal("BadInput", "a query id is 32 lowercase hex digits")
        if len(request.fetch_digest) != 32:
            raise Refusal("BadInput", "the fetch digest must be 32 bytes (SHA-256)")
        return model

    def _register(self, request, check_serving):
        """Record a submitted query (the caller holds ``self._cv``); ``check_serving``: this
        party decides what is served (worker 0), so it checks the serving session too."""
        if check_serving:
            if self._state == "failed":
                raise Refusal("WorkerLost", self._message)
            if self._state != wire.SERVING:
                raise Refusal("NotServing", "no model is being served: {}".format(
                    self._message))
            if request.session != self._session:
                raise Refusal("NotServing", "the model owner restarted serving; query again")
        if request.query_id in self._queries:
            raise Refusal("BadInput", "query id already in use")
        if len(self._queries) >= MAX_WAITING:
            raise Refusal("Busy", "{} holds {} queries already; try again later".format(
                self.config.name, MAX_WAITING))
        self._queries[request.query_id] = Query(request.query_id, request.fetch_digest,
                                                request.session)
        self._cv.notify_all()  # a Fetch that overtook this Submit waits for it

    def Submit(self, request, context, peer):
        model = self._submitted_model(request)
        from .mpc.store import SHARES

        if len(request.shares) != SHARES:
            raise Refusal("BadInput", "expected {} input shares, got {}".format(
                SHARES, len(request.shares)))
        try:
            pair = [wire.array(t, model.in_shape) for t in request.shares]
        except PrivateKerasError as exc:
            raise Refusal("BadInput", str(exc)) from None
        row = np.concatenate([np.ravel(s) for s in pair])
        with self._cv:
            self._register(request, check_serving=self.index == 0)
            model.inputs[request.query_id] = row
        if self.index == 0:
            self._arrived(request.query_id, 0)
        else:
            self._report_arrival(request.query_id)
        return M.Empty()

    def _report_arrival(self, query_id):
        """Tell worker 0 that this worker holds the shares of ``query_id`` (a note over the
        mesh, from the Submit call's own thread: it is on every query's way to its step).
        When worker 0 cannot be told, the query can never be evaluated: Submit fails."""
        from .errors import ClusterError

        try:
            self._mesh.note(0, arrived=query_id)
        except ClusterError as exc:
            with self._cv:
                self._queries.pop(query_id, None)
                self._model.drop([query_id])
            raise Refusal("WorkerLost", str(exc)) from None

    def Fetch(self, request, context, peer):
        if not self._long_polls.acquire(blocking=False):
            return M.FetchReply(ready=False)  # too many waiting: the client asks again
        try:
            return self._fetch(request, context)
        finally:
            self._long_polls.release()

    def _fetch(self, request, context):
        wait = min(max(request.wait_seconds, 0.0), MAX_FETCH_WAIT)
        deadline = time.monotonic() + min(wait, SUBMIT_GRACE)
        with self._cv:  # a client sends Fetch right behind Submit: it may arrive first
            query = self._queries.get(request.query_id)
            while query is None and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
                query = self._queries.get(request.query_id)
        if query is None:
            raise Refusal("BadInput", "worker {} holds no query with this id (never "
                          "submitted here, already fetched, or expired)".format(
                              self.config.name))
        if not wire.secret_matches(request.fetch_secret, query.digest):
            raise Refusal("Denied", "wrong fetch secret for this query")
        query.ready.wait(wait)
        with self._cv:
            if query.error is not None:
                self._queries.pop(query.id, None)
                raise Refusal(*query.error)
            if query.output is None:
                return M.FetchReply(ready=False)
            if self._queries.pop(query.id, None) is None:
                raise Refusal("BadInput", "this answer was already fetched")
            self._sending[query.session] += 1
        if not context.add_callback(lambda: self._sent(query.session)):
            self._sent(query.session)  # the call has ended already
        return self._reply(query)

    def _sent(self, session):
        """A Fetch that took an answer share ended (delivered, or the client went away)."""
        with self._cv:
            self._sending[session] -= 1
            if not self._sending[session]:
                del self._sending[session]
            self._cv.notify_all()

    def _reply(self, query):
        """The answer to a Fetch of an evaluated query: this worker's answer shares."""
        return M.FetchReply(ready=True, shares=[wire.tensor(s) for s in query.output])

    # -- between workers -------------------------------------------------------------------
    def _on_note(self, peer, note):
        """A note from worker ``peer`` over the mesh (None: the link to it failed)."""
        if note is None:
            warn("%s: lost the link to %s", self.config.name, self.config.names[peer])
            if self.index == 0:
                self._end_serving(self._session, "WorkerLost", "serving failed: lost the link "
                                  "to {}".format(self.config.names[peer]), failed=True)
            return
        if self.index == 0 and peer in self.PEERS and isinstance(note.get("arrived"), str):
            if QUERY_ID.match(note["arrived"]):
                self._arrived(note["arrived"], peer)
                return
        elif self.index != 0 and peer == 0 and _is_go(note):
            self._gos.put(note)
            return
        warn("%s: ignored a malformed note from %s", self.config.name,
             self.config.names[peer])

    def _arrived(self, query_id, index):
        with self._cv:
            held, since = self._arrivals.get(query_id, (set(), time.monotonic()))
            held.add(index)
            if held == {0, 1, 2}:
                self._arrivals.pop(query_id, None)
                query = self._queries.get(query_id)
                if query is not None and query.error is None:
                    self._mark_ready(query_id)
            elif len(self._arrivals) < 2 * MAX_WAITING:
                self._arrivals[query_id] = (held, since)

    def _mark_ready(self, query_id):
        """(Under the lock.) Query ``query_id`` may enter a step: queue it and wake the
        serving loop (only it)."""
        self._ready.append(query_id)
        self._work.notify()

    def _run_gos(self):
        """(Workers 1 and 2.) Run this worker's part of each step worker 0 starts, in order.
        A part that fails closes this worker's mesh links: the other parts of the step fail
        at once rather than wait for messages that will never come."""
        import tensorflow as tf

        while True:
            go = self._gos.get()
            if go is None:
                return
            model = self._model
            ids = list(go["ids"])
            step = model.steps.get(len(ids)) if (
                model is not None and model.id == go["model"] and model.steps) else None
            try:
                if step is None:
                    raise Refusal("Failed", "worker 0 started a step for a model or group size "
                                            "this worker has not traced")
                with self._cv:
                    self._session = go["session"]
                answers = self._run_part(model, step, go["go"], ids)
            except (Refusal, tf.errors.OpError) as exc:
                message = exc.message if isinstance(exc, Refusal) else _first_line(exc)
                warn("%s: its part of step %d failed: %s; closing its mesh links",
                     self.config.name, go["go"], message)
                with self._cv:
                    for qid in ids:
                        query = self._queries.get(qid)
                        if query is not None and query.output is None:
                            query.error = ("WorkerLost", "serving failed on {}: {}".format(
                                self.config.name, message))
                            query.ready.set()
                self._mesh.close()
                continue
            self._deliver(model, ids, answers)

    # -- housekeeping ----------------------------------------------------------------------
    def _janitor(self):
        """Drop queries nobody evaluated or fetched within QUERY_TTL seconds."""
        while not self._closing.wait(5.0):
            now = time.monotonic()
            with self._cv:
                old = [q.id for q in self._queries.values() if now - q.born > QUERY_TTL]
                for qid in old:
                    del self._queries[qid]
                for qid in [q for q, (_, t) in self._arrivals.items() if now - t > QUERY_TTL]:
                    del self._arrivals[qid]
                model = self._model
                if old and model is not None:
                    model.drop(old)


def _is_go(note):
    """Whether a note is a well-formed "go": step id, session, model id, query ids."""
    ids = note.get("ids")
    return (isinstance(note.get("go"), int) and note["go"] > 0 and
            isinstance(note.get("session"), str) and isinstance(note.get("model"), str) and
            isinstance(ids, list) and 0 < len(ids) <= 16 and
            all(isinstance(q, str) and (q == PAD or QUERY_ID.match(q)) for q in ids))


def _first_line(exc):
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _nodes_ok(nodes):
    """A non-empty list of nodes of known kinds, each reading only earlier nodes or the
    input, with positive weight and output shapes."""
    from . import layers

    known = set(layers.kinds())
    return isinstance(nodes, list) and len(nodes) > 0 and all(
        isinstance(node, dict) and node.get("kind") in known
        and isinstance(node.get("params", {}), dict)
        and isinstance(node.get("inputs"), list) and len(node["inputs"]) > 0
        and all(isinstance(i, int) and layers.INPUT <= i < k for i in node["inputs"])
        and all(isinstance(d, int) and d > 0 for d in node["shape"])
        and all(all(isinstance(d, int) and d > 0 for d in s) for s in node["weight_shapes"])
        for k, node in enumerate(nodes))


def _parse_spec(text):
    """The public model spec of an upload, checked enough to size the worker's resources."""
    try:
        spec = json.loads(text)
        ok = (isinstance(spec, dict) and MODEL_ID.match(str(spec.get("model_id", "")))
              and spec.get("protocol") == "aby3"
              and all(isinstance(d, int) and d > 0 for d in spec["input_shape"])
              and all(isinstance(d, int) and d > 0 for d in spec["output_shape"])
              and spec["input_shape"][0] == spec["output_shape"][0]
              and _nodes_ok(spec["nodes"])
              and 1 <= int(spec.get("max_group", 1)) <= 16)
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise Refusal("BadInput", "the uploaded model spec is malformed")
    spec.setdefault("name", "model")
    return spec
