"""The wire between parties: messages, methods, who may call what, and error translation.

The model owner, the clients and the workers meet here and nowhere else; none of them imports
another. Every party talks to a worker's API over gRPC with mutual TLS: the certificate a
peer presents (issued by the cluster's CA) carries its name (CN) and its role (OU: ``worker``,
``owner`` or ``client``), and each method lists the roles allowed to call it. There is no
method that evaluates a graph or reads worker state by name, and no method hands a share to
anyone but the party it belongs to:

========== =============== ==================================================================
method      callers         what it does
========== =============== ==================================================================
Status      anyone          the public board: served model's public spec, serving state (to
                            workers also: answer shares of the session held, not yet fetched)
Upload      owner           this worker's weight shares and the model's public spec (stream)
Prepare     owner           the workers trace their parts of the private step and warm them
                            up (progress stream, from worker 0)
Serve       owner           worker 0 answers queries while this call lasts (event stream)
StopServing owner           worker 0 ends serving
Submit      client          this worker's input shares under a fresh random query id
Fetch       client          this worker's output shares, for the per-worker fetch secret
Trace       worker          trace your own part of the private step (worker 0 -> 1, 2)
========== =============== ==================================================================

While serving, the workers' notes to each other ("I hold query q's shares", "go: run step s on
these queries") go over their own links (:mod:`privatekeras.deploy.mesh`), not this API.

The one-server CKKS backend (:mod:`privatekeras.ckks`) is a worker of its own with the same
API: ``Upload`` carries the model in clear, ``Submit`` the client's public context and
encrypted rows, ``Fetch`` the encrypted outputs; ``Trace`` is refused there.

The protobuf messages are declared below in Python (a FileDescriptorProto built at import), so
no generated code or protoc is needed; the wire format is ordinary protobuf.
"""

import hashlib
import hmac

import grpc
import grpc.aio
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .errors import (AccessDeniedError, InputError, NotServingError,
                     OwnerUnavailableError, PrivateKerasError, WorkerUnavailableError)

SERVICE = "privatekeras.Worker"
ROLES = ("worker", "owner", "client")
ANYONE, OWNER, CLIENT, WORKER = ROLES, ("owner",), ("client",), ("worker",)
MAX_MESSAGE = 256 * 1024 * 1024  # one upload chunk or one query's shares

# -- messages -----------------------------------------------------------------------------
_T = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"int64": _T.TYPE_INT64, "int32": _T.TYPE_INT32, "string": _T.TYPE_STRING,
            "bytes": _T.TYPE_BYTES, "bool": _T.TYPE_BOOL, "double": _T.TYPE_DOUBLE}

# name -> [(field, type, repeated)]; a type that is not a scalar names another message.
MESSAGES = {
    "Empty": [],
    "Tensor": [("shape", "int64", True), ("data", "bytes", False)],  # int64, little-endian
    "Board": [("worker", "string", False), ("index", "int32", False),
              ("state", "string", False), ("session", "string", False),
              ("answered", "int64", False), ("message", "string", False),
              ("model_id", "string", False), ("spec_json", "string", False),
              # to workers only: answer shares of `session` held and not yet fetched
              ("unfetched", "int64", False)],
    "UploadChunk": [("spec_json", "string", False), ("weights", "Tensor", True)],
    "PrepareRequest": [("model_id", "string", False)],
    "Progress": [("message", "string", False), ("seconds", "double", False),
                 ("done", "bool", False)],
    "ServeRequest": [("num_requests", "int64", False), ("unlimited", "bool", False),
                     ("idle_timeout", "double", False)],
    "ServeEvent": [("answered", "int64", False), ("message", "string", False),
                   ("session", "string", False), ("step_seconds", "double", False)],
    "SubmitRequest": [("query_id", "string", False), ("model_id", "string", False),
                      ("session", "string", False), ("shares", "Tensor", True),
                      ("fetch_digest", "bytes", False),
                      # CKKS server: the client's public context, one ciphertext per feature
                      ("context", "bytes", False), ("blobs", "bytes", True)],
    "FetchRequest": [("query_id", "string", False), ("fetch_secret", "bytes", False),
                     ("wait_seconds", "double", False)],
    "FetchReply": [("ready", "bool", False), ("shares", "Tensor", True),
                   ("blobs", "bytes", True)],  # CKKS server: one ciphertext per output
    # one digest of the traced step's messages per group size (privatekeras.mpc.partition)
    "TraceReply": [("plans", "string", True)],
}


def _build_messages():
    fdp = descriptor_pb2.FileDescriptorProto(name="privatekeras/wire.proto",
                                             package="privatekeras", syntax="proto3")
    for name, fields in MESSAGES.items():
        msg = fdp.message_type.add(name=name)
        for number, (field, kind, repeated) in enumerate(fields, start=1):
            f = msg.field.add(name=field, number=number,
                              label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
            if kind in _SCALARS:
                f.type = _SCALARS[kind]
            else:
                f.type, f.type_name = _T.TYPE_MESSAGE, ".privatekeras." + kind
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(
        pool.FindMessageTypeByName("privatekeras." + name)) for name in MESSAGES}


M = type("Messages", (), _build_messages())  # M.Board, M.SubmitRequest, ...

# -- methods ------------------------------------------------------------------------------
# name -> (kind, request, reply, roles allowed to call it)
METHODS = {
    "Status": ("unary_unary", "Empty", "Board", ANYONE),
    "Upload": ("stream_unary", "UploadChunk", "Board", OWNER),
    "Prepare": ("unary_stream", "PrepareRequest", "Progress", OWNER),
    "Serve": ("unary_stream", "ServeRequest", "ServeEvent", OWNER),
    "StopServing": ("unary_unary", "Empty", "Board", OWNER),
    "Submit": ("unary_unary", "SubmitRequest", "Empty", CLIENT),
    "Fetch": ("unary_unary", "FetchRequest", "FetchReply", CLIENT),
    "Trace": ("unary_unary", "PrepareRequest", "TraceReply", WORKER),
}

# Board states, in the order a worker goes through them.
EMPTY, LOADED, READY, SERVING = "empty", "loaded", "ready", "serving"


def tensor(array):
    """A Tensor message holding an int64 array."""
    a = np.ascontiguousarray(array, dtype="<i8")
    return M.Tensor(shape=list(a.shape), data=a.tobytes())


def array(message, shape=None):
    """The int64 array of a Tensor message; InputError when it is malformed or, given
    ``shape``, of another shape."""
    dims = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in dims) or len(message.data) != 8 * int(np.prod(dims, dtype=np.int64)):
        raise InputError("a share tensor's data does not match its shape {}".format(dims))
    if shape is not None and dims != tuple(shape):
        raise InputError("a share has shape {}, the served model expects {}".format(
            dims, tuple(shape)))
    return np.frombuffer(message.data, dtype="<i8").reshape(dims).astype(np.int64)


def digest(secret):
    """What a client sends with its shares: the SHA-256 of its per-worker fetch secret."""
    return hashlib.sha256(secret).digest()


def secret_matches(secret, expected_digest):
    """Constant-time check of a fetch secret against the digest sent with the shares."""
    return hmac.compare_digest(digest(secret), expected_digest)


# -- errors -------------------------------------------------------------------------------
# A worker refuses a call with a status code and a detail "Kind: message"; the caller turns
# the kind back into the exception below. Transport failures are translated in the same place.
KINDS = {
    "NotServing": (grpc.StatusCode.FAILED_PRECONDITION, NotServingError),
    "OwnerGone": (grpc.StatusCode.FAILED_PRECONDITION, OwnerUnavailableError),
    "Busy": (grpc.StatusCode.FAILED_PRECONDITION, PrivateKerasError),
    "BadInput": (grpc.StatusCode.INVALID_ARGUMENT, InputError),
    "Denied": (grpc.StatusCode.PERMISSION_DENIED, AccessDeniedError),
    "WorkerLost": (grpc.StatusCode.UNAVAILABLE, WorkerUnavailableError),
    "Failed": (grpc.StatusCode.INTERNAL, PrivateKerasError),
}


class Refusal(Exception):
    """Raised inside a worker's method to refuse the call with one of :data:`KINDS`."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind, self.message = kind, message


def translate(exc, where):
    """The privatekeras exception for a failed call to a worker (``where`` names it).

    Refusals keep their kind and message; an unreachable or silent worker becomes
    WorkerUnavailableError; a failed TLS handshake becomes AccessDeniedError naming the
    credentials as the thing to fix.
    """
    if not isinstance(exc, grpc.RpcError):
        return exc
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    kind, _, message = details.partition(": ")
    if kind in KINDS:
        return KINDS[kind][1](message)
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if any(w in lowered for w in ("handshake", "ssl", "certificate", "hostname")):
            return AccessDeniedError(
                "the TLS handshake with worker {} failed: it does not accept this party's "
                "certificate, or its own is not from this cluster's CA or does not name it "
                "({}). Use the credentials of this cluster (hosts file / a cluster started "
                "by this user)".format(where, details.strip()))
        if "socket closed" in lowered:  # what a worker's refusal of a certificate looks like
            return WorkerUnavailableError(
                "worker {} closed the connection: it is unreachable, or it refused this "
                "party's certificate (not of this cluster's CA)".format(where))
        return WorkerUnavailableError("worker {} is unreachable: {}".format(
            where, details.strip() or "connection failed"))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkerUnavailableError("worker {} did not answer in time".format(where))
    if code == grpc.StatusCode.CANCELLED:
        return WorkerUnavailableError("the call to worker {} was cancelled".format(where))
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return AccessDeniedError("worker {} refused: {}".format(where, details))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PrivateKerasError("worker {} is overloaded or the message is too large: "
                                 "{}".format(where, details))
    return PrivateKerasError("worker {} failed: {} {}".format(
        where, code.name if code else "", details).strip())


# -- channels (callers) -------------------------------------------------------------------
def _channel_args(credentials, worker_name):
    creds = grpc.ssl_channel_credentials(root_certificates=credentials.ca,
                                         private_key=credentials.key,
                                         certificate_chain=credentials.cert)
    options = [("grpc.ssl_target_name_override", worker_name),
               ("grpc.default_authority", worker_name),
               ("grpc.max_send_message_length", MAX_MESSAGE),
               ("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.enable_retries", 0)]
    return creds, options


def channel(address, credentials, worker_name):
    """A mutually authenticated channel to a worker's API; the worker must present a
    certificate of the cluster's CA naming ``worker_name``."""
    creds, options = _channel_args(credentials, worker_name)
    return grpc.secure_channel(address, creds, options=options)


def aio_channel(address, credentials, worker_name):
    """The same channel for asyncio (:mod:`grpc.aio`); make it inside the event loop that
    will use it. Calls on it start without a thread each (the blocking API's ``future()``
    starts one), which is what a client's per-query calls need."""
    creds, options = _channel_args(credentials, worker_name)
    return grpc.aio.secure_channel(address, creds, options=options)


class Stub:
    """Callables for every method of one worker, over ``channel`` (blocking or asyncio):
    ``stub.Submit(request, timeout=...)``, ``stub.Fetch.future(...)``, ``for event in
    stub.Serve(request)``; with an asyncio channel, ``await stub.Submit(...)``."""

    def __init__(self, chan):
        self.channel = chan
        for name, (kind, request, reply, _roles) in METHODS.items():
            make = getattr(chan, kind)
            setattr(self, name, make("/{}/{}".format(SERVICE, name),
                                     request_serializer=getattr(M, request).SerializeToString,
                                     response_deserializer=getattr(M, reply).FromString))

    def close(self):
        """Close the channel (for an asyncio channel: returns the coroutine to await)."""
        return self.channel.close()


# -- handlers (the worker's side) ---------------------------------------------------------
def peer_identity(context):
    """``(name, role)`` of the authenticated peer of a call, or None."""
    from .deploy.pki import identity

    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        return identity(pems[0])
    except ValueError:
        return None


def handlers(servicer):
    """A gRPC generic handler for ``servicer``, which has one method per entry of
    :data:`METHODS` taking ``(request, context, peer)``; ``peer`` is the caller's
    ``(name, role)``, already checked against the roles allowed to call the method. A
    :class:`Refusal` raised by a method aborts the call with its kind."""
    methods = {}
    for name, (kind, request, reply, roles) in METHODS.items():
        impl = getattr(servicer, name)
        wrapped = _guard(name, impl, roles, kind.endswith("_stream"))
        factory = getattr(grpc, kind + "_rpc_method_handler")
        methods[name] = factory(wrapped,
                                request_deserializer=getattr(M, request).FromString,
                                response_serializer=getattr(M, reply).SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _abort(context, kind, message):
    context.abort(KINDS[kind][0], "{}: {}".format(kind, message))


def _admit(name, roles, context):
    peer = peer_identity(context)
    if peer is None:
        _abort(context, "Denied", "no valid certificate of this cluster was presented")
    if peer[1] not in roles:
        _abort(context, "Denied", "{} may be called by {} only; {!r} is a {}".format(
            name, " or ".join(roles), peer[0], peer[1]))
    return peer


def _failed(name, context, exc):
    """An unexpected error in a method: logged in full on the worker, reported in one line."""
    from .log import logger

    logger.exception("%s failed", name)
    text = str(exc).strip().splitlines()
    _abort(context, "Failed", "{}: {}".format(type(exc).__name__, text[0] if text else ""))


def _guard(name, impl, roles, streaming):
    if streaming:
        def stream(request, context):
            peer = _admit(name, roles, context)
            try:
                yield from impl(request, context, peer)
            except Refusal as refusal:
                _abort(context, refusal.kind, refusal.message)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                _failed(name, context, exc)
        return stream

    def unary(request, context):
        peer = _admit(name, roles, context)
        try:
            return impl(request, context, peer)
        except Refusal as refusal:
            _abort(context, refusal.kind, refusal.message)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            _failed(name, context, exc)
    return unary


def server_credentials(credentials):
    """Server-side TLS: present this worker's certificate, require a client certificate
    chained to the cluster's CA."""
    return grpc.ssl_server_credentials([(credentials.key, credentials.cert)],
                                       root_certificates=credentials.ca,
                                       require_client_auth=True)


SERVER_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
                  ("grpc.max_receive_message_length", MAX_MESSAGE),
                  ("grpc.so_reuseport", 0)]

