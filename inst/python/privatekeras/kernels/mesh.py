"""The mesh transport's Python side: hand the workers' sockets to the kernels, and the
PkMeshSend / PkMeshRecv ops (``pk_mesh.cc``).

Each worker process holds one connected, authenticated stream socket to each of its two peers;
:func:`attach` gives a duplicate of its fd to the C++ mesh state in ``pk_ops.so``, whose reader
thread then receives that peer's frames. In the graph, a tensor crossing from worker a to
worker b is :func:`send` on a and :func:`recv` on b, named by the same ``(step, edge)``.

The C API is reached through ctypes on the very library file TensorFlow loaded (same path, so
``dlopen`` returns the same handle and the ops and this module share one mesh state).
"""

import atexit
import ctypes
import os
import threading

from ..errors import ClusterError
from . import loader
from .build import default_library_path

_lib = None
_lock = threading.Lock()
_ERRLEN = 1024


def _library():
    """The kernel library (after TensorFlow loaded it) with the C API's signatures set."""
    global _lib
    with _lock:
        if _lib is None:
            loader.load()  # the ops are registered by TensorFlow's load of this same file
            lib = ctypes.CDLL(default_library_path())
            lib.pk_mesh_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                           ctypes.c_int]
            lib.pk_mesh_attach.restype = ctypes.c_int
            lib.pk_mesh_set_timeout.argtypes = [ctypes.c_double]
            lib.pk_mesh_set_timeout.restype = None
            lib.pk_mesh_attached.argtypes = [ctypes.c_int]
            lib.pk_mesh_attached.restype = ctypes.c_int
            lib.pk_mesh_close.argtypes = []
            lib.pk_mesh_close.restype = None
            lib.pk_mesh_pending.argtypes = []
            lib.pk_mesh_pending.restype = ctypes.c_int
            # Readers and the watchdog must not outlive the interpreter's teardown.
            atexit.register(lib.pk_mesh_close)
            _lib = lib
        return _lib


def attach(peer, sock):
    """Make ``sock`` (a connected stream socket, or its fd) the link to worker ``peer``
    (0, 1 or 2) and start receiving from it.

    The mesh gets a duplicate of the fd; the caller's socket stays open and its own (close it
    whenever convenient: the link lives on until :func:`close` or the link fails). Raises
    ClusterError with the kernels' message when refused (bad peer index, not a stream socket,
    peer already attached).
    """
    fd = sock if isinstance(sock, int) else sock.fileno()
    dup = os.dup(fd)  # the mesh owns (and eventually closes) the duplicate, refused or not
    err = ctypes.create_string_buffer(_ERRLEN)
    if _library().pk_mesh_attach(int(peer), dup, err, _ERRLEN) != 0:
        raise ClusterError("could not attach worker {} to the mesh: {}".format(
            peer, err.value.decode("utf-8", "replace")))


def set_timeout(seconds):
    """How long a receive waits for its message, and a send for its peer to be attached and to
    take its bytes, before failing with DeadlineExceeded (seconds; default 60). Applies to
    sends and receives that start afterwards."""
    _library().pk_mesh_set_timeout(float(seconds))


def attached(peer):
    """1 when worker ``peer`` is attached and its link healthy, 0 when not attached yet, -1
    when its link failed (closed by the peer, broken, or a malformed frame)."""
    return _library().pk_mesh_attached(int(peer))


def close():
    """Close every link (the peers see the connection end), fail receives still waiting with
    Cancelled, drop undelivered messages and stop the mesh's threads. Peers can be attached
    again afterwards."""
    _library().pk_mesh_close()


def pending():
    """Messages received but not yet taken, plus receives still waiting (for tests)."""
    return _library().pk_mesh_pending()


def send(step, x, peer, edge, name=None):
    """PkMeshSend: write tensor ``x`` to worker ``peer`` as message ``(step, edge)``.

    ``step`` is a scalar int64 (tensor or number); ``x`` is a fixed-width integer (8 to 64
    bits, signed or not) or bool, of rank <= 8. Blocks until the bytes are handed to the socket.
    """
    import tensorflow as tf

    return loader.ops().pk_mesh_send(tf.cast(step, tf.int64), x, peer=int(peer),
                                     edge=int(edge), name=name)


def recv(step, dtype, shape, peer, edge, name=None):
    """PkMeshRecv: the tensor worker ``peer`` sent as message ``(step, edge)``.

    ``dtype`` is the message's dtype and ``shape`` its static shape (a list, a
    ``tf.TensorShape`` or None for unknown); a message of another dtype, or of a shape
    incompatible with ``shape``, fails with InvalidArgument.
    """
    import tensorflow as tf

    return loader.ops().pk_mesh_recv(tf.cast(step, tf.int64), T=tf.as_dtype(dtype),
                                     peer=int(peer), edge=int(edge),
                                     shape=tf.TensorShape(shape), name=name)
