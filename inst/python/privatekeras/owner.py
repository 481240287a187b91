"""The model owner's side: secret-share a Keras model's weights onto the workers and serve.

The owner converts the model, encodes and secret-shares every weight here, in its own process
(OS CSPRNG), and uploads to each worker only that worker's shares with the model's public
spec (architecture and shapes). Worker 0 then traces and warms up the private step. While
:meth:`SharedModel.serve` runs, worker 0 answers clients' queries; the owner takes no part in
the computation and never sees a client's shares.
"""

import os
import threading

from . import layers, wire
from .convert import check_input_range, check_range, convert
from .errors import PrivateKerasError
from .log import say
from .mpc.encoding import FIXED64, share as share_ring

PROTOCOLS = ("aby3",)
UPLOAD_TIMEOUT = 600.0
PREPARE_TIMEOUT = 900.0


def check_protocol(protocol):
    """Validate a protocol name and return it normalised."""
    name = str(protocol).lower()
    if name == "pond":
        raise ValueError("protocol 'pond' is not offered: its ReLU is a polynomial approximation "
                         "that gives wrong predictions; use 'aby3'")
    if name == "securenn":
        raise ValueError(
            "protocol 'securenn' is withdrawn: TF Encrypted's SecureNN hands worker 2 the "
            "zero-test values of its private comparison unpermuted, so worker 2 learns high "
            "bits of every ReLU and MaxPool input. Use 'aby3' (the default)")
    if name not in PROTOCOLS:
        raise ValueError("unknown protocol {!r}; choose one of {}".format(protocol, PROTOCOLS))
    return name


def public_spec(spec, protocol, batch_size, max_group, input_range=None):
    """What the workers are told about a converted model: architecture and shapes (public in
    the threat model), never a weight. Clients are shown only its shapes, encoding, final
    activation and declared input range."""
    return {
        "model_id": os.urandom(8).hex(),
        "name": spec.name,
        "protocol": protocol,
        "batch_size": batch_size,
        "input_shape": [batch_size] + [int(d) for d in spec.input_shape],
        "output_shape": [batch_size] + [int(d) for d in spec.output_shape],
        "output_activation": spec.output_activation,
        "input_range": None if input_range is None else list(input_range),
        "fixed_point": FIXED64.describe(),
        # the answer's fractional bits: twice the encoding's when the workers leave the last
        # product untruncated (privatekeras.layers.exact_output)
        "output_frac_bits": FIXED64.frac_bits * (
            2 if layers.exact_output([n.kind for n in spec.nodes]) else 1),
        "max_group": max_group,
        "nodes": [node.public() for node in spec.nodes],
    }


def _upload_chunks(spec_json, weights, index):
    """The stream worker ``index`` receives: the spec, then its pair of shares of each weight
    (``weights[k][index]``)."""
    yield wire.M.UploadChunk(spec_json=spec_json)
    for per_worker in weights:
        yield wire.M.UploadChunk(weights=[wire.tensor(s) for s in per_worker[index]])


class SharedModel:
    """A Keras model whose weights are secret-shared on a cluster's three workers.

    Made by :func:`share`; :meth:`serve` answers private queries, :meth:`stop` ends serving.
    The owner's process keeps the plaintext model; each worker holds only its shares.
    """

    def __init__(self, cluster, spec, public):
        self.cluster = cluster
        self.spec = spec  # the converted model (privatekeras.convert.ModelSpec)
        self.public_spec = public
        self.protocol = public["protocol"]
        self.batch_size = public["batch_size"]
        self.max_group = public["max_group"]
        self.input_shape = tuple(public["input_shape"])
        self.output_shape = tuple(public["output_shape"])
        self.model_id = public["model_id"]
        self.served = 0
        self.serving = False
        self.step_seconds = []  # run time of each private step of the last serve() call
        self._call = None  # the Serve call in progress
        self._lock = threading.Lock()

    def __repr__(self):
        extra = "".join(" {}={}".format(k, v) for k, v in (
            ("input_range", self.public_spec.get("input_range")),
            ("final_activation", self.public_spec.get("output_activation"))) if v is not None)
        return ("<privatekeras.SharedModel {!r} protocol={} input={} output={}{} {} "
                "served={}>").format(self.spec.name, self.protocol, self.input_shape,
                                     self.output_shape, extra,
                                     "serving" if self.serving else "not serving", self.served)

    def _worker0(self):
        return self.cluster.stubs("owner")[0], self.cluster.worker_names[0]

    def serve(self, num_requests=None, idle_timeout=None):
        """Answer private queries; blocks until ``num_requests`` are answered or :meth:`stop`.

        Worker 0 evaluates queries in arrival order (up to ``max_group`` clients' queries in
        one step); each answer goes only to the client that asked. Serving lasts as long as
        this call: if this process ends, the workers stop serving and waiting clients are
        told that the owner is gone. Returns after the clients have fetched every answer.

        Args:
            num_requests: how many queries to answer; None serves until :meth:`stop` is
                called (from another thread or process) or this process is interrupted.
            idle_timeout: seconds to wait for the next query before returning (None: wait
                indefinitely).
        Returns:
            the number of queries answered.
        Raises:
            WorkerUnavailableError: a worker stopped answering (serving ends).
        """
        if num_requests is not None:
            num_requests = int(num_requests)
            if num_requests < 0:
                raise ValueError("num_requests must be >= 0 or None")
        if idle_timeout is not None and float(idle_timeout) <= 0:
            raise ValueError("idle_timeout must be a positive number of seconds or None")
        if num_requests == 0:
            return 0
        stub, name = self._worker0()
        request = wire.M.ServeRequest(num_requests=num_requests or 0,
                                      unlimited=num_requests is None,
                                      idle_timeout=float(idle_timeout or 0.0))
        answered = 0
        self.step_seconds = []
        say("serving {} ({} requests)".format(
            self.spec.name, "unlimited" if num_requests is None else num_requests))
        with self._lock:
            self._call = stub.Serve(request)
            self.serving = True
        try:
            for event in self._call:
                if event.step_seconds:
                    self.step_seconds.append(event.step_seconds)
                if event.answered > answered:
                    self.served += event.answered - answered
                    answered = event.answered
                    say("answered request {}{}".format(
                        answered, "" if num_requests is None else "/{}".format(num_requests)))
        except KeyboardInterrupt:
            self._call.cancel()  # worker 0 ends serving when the call goes away
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            raise wire.translate(exc, name) from None
        finally:
            with self._lock:
                self.serving, self._call = False, None
        return answered

    def stop(self):
        """Stop serving: :meth:`serve` returns after the query in progress."""
        stub, name = self._worker0()
        with self._lock:
            serving = self.serving
            self.serving = False
        if serving:
            try:
                stub.StopServing(wire.M.Empty(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - translated
                raise wire.translate(exc, name) from None
        return self


def _upload(cluster, public, shares):
    """Upload each worker's shares (in parallel); returns when all three hold them."""
    import json

    spec_json = json.dumps(public)
    stubs = cluster.stubs("owner")
    calls = [stub.Upload.future(_upload_chunks(spec_json, shares, i), timeout=UPLOAD_TIMEOUT)
             for i, stub in enumerate(stubs)]
    for name, call in zip(cluster.worker_names, calls):
        try:
            call.result()
        except Exception as exc:  # noqa: BLE001 - translated
            raise wire.translate(exc, name) from None


def _prepare(cluster, model_id):
    """Worker 0 traces the private step and runs it once on zeros (progress shown here)."""
    stub, name = cluster.stubs("owner")[0], cluster.worker_names[0]
    try:
        for progress in stub.Prepare(wire.M.PrepareRequest(model_id=model_id),
                                     timeout=PREPARE_TIMEOUT):
            if progress.message and not progress.done:
                say(progress.message)
    except Exception as exc:  # noqa: BLE001 - translated
        raise wire.translate(exc, name) from None


def share(model, cluster, protocol="aby3", batch_size=None, max_group=1, input_range=None):
    """Secret-share a Keras model's weights onto a running cluster.

    Converts the model, encodes and shares every weight in this process, uploads each worker
    its shares, and has worker 0 trace and warm up the private step, so ``serve()`` answers
    its first query at full speed.

    Args:
        model: a Keras model (Sequential or functional: branches, residual ``Add`` and
            ``Concatenate`` joins, nested models), or the path of a ``.keras`` / ``.h5``
            file. Layers: see ``privatekeras.supported_layers()``.
        cluster: a started :class:`~privatekeras.Cluster` (or one whose workers run
            elsewhere).
        protocol: ``"aby3"`` (the only one offered; see docs/security.md for why SecureNN
            and Pond are not).
        batch_size: images per private evaluation; defaults to the model's fixed batch size,
            else 1. Clients may send any number of images: they are padded to whole batches.
        max_group: when several clients' queries are waiting, evaluate up to this many in one
            private step (their batches concatenated; each answer still goes only to its
            client). Raises throughput under concurrent load; costs a second trace.
        input_range: ``(lo, hi)``, the values the model's inputs take (e.g. ``(0, 1)`` or
            ``(0, 255)``). Every value of the private evaluation is bounded from it and the
            weights, and a model that could leave the fixed-point headroom is refused;
            clients refuse inputs outside it. Default: the encoding's whole range
            (-2048, 2048), for which larger models are refused: declare the real range.
    Returns:
        a :class:`SharedModel`.
    Raises:
        UnsupportedLayerError: a layer cannot be evaluated privately (named in the message).
        OutOfRangeError: a layer could leave the fixed-point headroom for this input range.

    On a CKKS :class:`~privatekeras.Server`, the model goes to the one server in clear
    (``privatekeras.ckks.owner.share``; ``protocol``, ``batch_size`` and ``max_group`` do
    not apply).
    """
    if getattr(cluster, "scheme", "aby3") == "ckks":
        from .ckks.owner import share as share_ckks

        return share_ckks(model, cluster, input_range=input_range)
    protocol = check_protocol(protocol)
    max_group = int(max_group)
    if not 1 <= max_group <= 16:
        raise ValueError("max_group must be an integer in 1..16, got {}".format(max_group))
    input_range = check_input_range(input_range)
    spec = convert(model)
    top = check_range(spec, input_range)
    if batch_size is None:
        batch_size = spec.batch_size or 1
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError("batch_size must be a positive integer, got {}".format(batch_size))
    if spec.batch_size not in (None, batch_size):
        raise ValueError("the model has a fixed batch size of {}, but batch_size={} was "
                         "asked for".format(spec.batch_size, batch_size))
    public = public_spec(spec, protocol, batch_size, max_group, input_range)
    weights = spec.weights
    say("secret-sharing {} weights of model {!r} onto the workers (largest value of the "
        "private evaluation: {:.3g}, headroom {:.3g}) ...".format(
            len(weights), spec.name, top, FIXED64.headroom))
    try:
        shares = [share_ring(FIXED64.encode(w, what="weight")) for w in weights]
    except PrivateKerasError as exc:
        raise ValueError("the model cannot be encoded in fixed point: {}".format(exc)) from None
    _upload(cluster, public, shares)
    _prepare(cluster, public["model_id"])
    return SharedModel(cluster, spec, public)


__all__ = ["SharedModel", "share", "check_protocol"]
