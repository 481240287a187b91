"""Test instrumentation shared by privacy_owner.py and privacy_client.py: record, inside the
process that makes them, every API message this party exchanges with each worker.

The API is gRPC over mutual TLS, so a recording of its bytes shows nothing readable; what a
worker receives from an owner or client is observed here instead, at the message level, in the
sender's own process: :func:`record_api` wraps the stubs that :meth:`Cluster.stubs` makes, so
every request sent to worker i and every reply from worker i is kept (serialized protobuf, with
the method name and a CLOCK_MONOTONIC time stamp). Nothing is added to the library and no
byte is added to the wire. :func:`save` writes what was kept as a pickle for the test.
"""

import pickle
import threading
import time

LOG = []
_LOCK = threading.Lock()


def now():
    """CLOCK_MONOTONIC, the clock of the test's recording proxies too."""
    return time.monotonic()


def _keep(worker, method, kind, message):
    item = {"worker": worker, "method": method, "kind": kind, "time": now(),
            "data": message.SerializeToString()}
    with _LOCK:
        LOG.append(item)


def _tap_requests(iterator, worker, method):
    for message in iterator:
        _keep(worker, method, "request", message)
        yield message


class _TappedStream:
    """A server-streaming call whose replies are kept as they are read; everything else
    (cancel(), ...) goes to the call itself."""

    def __init__(self, call, worker, method):
        self._call, self._worker, self._method = call, worker, method

    def __iter__(self):
        return self

    def __next__(self):
        message = next(self._call)
        _keep(self._worker, self._method, "reply", message)
        return message

    def __getattr__(self, name):
        return getattr(self._call, name)


class _TappedMethod:
    """One method of a worker's stub (a gRPC multi-callable), recording both ways."""

    def __init__(self, inner, worker, method, kind):
        self._inner, self._worker, self._method, self._kind = inner, worker, method, kind

    def _request(self, request):
        if self._kind.startswith("stream_"):
            return _tap_requests(request, self._worker, self._method)
        _keep(self._worker, self._method, "request", request)
        return request

    def __call__(self, request, *args, **kwargs):
        result = self._inner(self._request(request), *args, **kwargs)
        if self._kind.endswith("_stream"):
            return _TappedStream(result, self._worker, self._method)
        _keep(self._worker, self._method, "reply", result)
        return result

    def future(self, request, *args, **kwargs):
        future = self._inner.future(self._request(request), *args, **kwargs)

        def done(f):
            if not f.cancelled() and f.exception() is None:
                _keep(self._worker, self._method, "reply", f.result())

        future.add_done_callback(done)
        return future


class _TappedAsyncMethod:
    """The same for a client's asyncio stubs: the call becomes a task that keeps the reply."""

    def __init__(self, inner, worker, method):
        self._inner, self._worker, self._method = inner, worker, method

    def __call__(self, request, *args, **kwargs):
        import asyncio

        _keep(self._worker, self._method, "request", request)
        call = self._inner(request, *args, **kwargs)

        async def keep_reply():
            reply = await call
            _keep(self._worker, self._method, "reply", reply)
            return reply

        return asyncio.ensure_future(keep_reply())  # cancel() works as on a call


def record_api():
    """From now on, every stub a Cluster (or a client's asyncio link) makes in this process
    records its messages."""
    from privatekeras import client as client_module
    from privatekeras import wire
    from privatekeras.cluster import Cluster

    link_init = client_module._Link.__init__

    def init(self, cluster):
        link_init(self, cluster)
        for i, stub in enumerate(self.stubs):
            for name in wire.METHODS:
                setattr(stub, name, _TappedAsyncMethod(getattr(stub, name), i, name))

    client_module._Link.__init__ = init

    original = Cluster.stubs

    def stubs(self, role):
        fresh = role not in self._stubs
        out = original(self, role)
        if fresh:
            for i, stub in enumerate(out):
                for name, (kind, _req, _rep, _roles) in wire.METHODS.items():
                    setattr(stub, name, _TappedMethod(getattr(stub, name), i, name, kind))
        return out

    Cluster.stubs = stubs


def save(path, **extra):
    """Write the kept messages (and ``extra`` values) to ``path`` (pickle)."""
    with _LOCK:
        log = list(LOG)
    with open(path, "wb") as f:
        pickle.dump(dict(extra, messages=log), f)
