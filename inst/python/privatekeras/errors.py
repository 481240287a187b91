"""Exceptions raised by privatekeras. Each message says what went wrong and how to fix it.

Every one derives from :class:`PrivateKerasError`; R gets the whole chain as condition classes
(``privatekeras_PortInUseError``, ``privatekeras_ClusterError``,
``privatekeras_PrivateKerasError``, ...). This module imports nothing of privatekeras, so any
module may import it.
"""


class PrivateKerasError(Exception):
    """Base class of privatekeras' errors."""


class KernelsMissingError(PrivateKerasError, RuntimeError):
    """The secure kernels are not built for this TensorFlow; privatekeras will not start.
    (Also importable from :mod:`privatekeras.kernels`, where they are loaded.)"""


class ClusterError(PrivateKerasError):
    """A cluster is misconfigured, or its workers failed to start or died."""


class PortInUseError(ClusterError):
    """A worker's port is already taken by another process (or another cluster)."""


class UnsupportedLayerError(PrivateKerasError, ValueError):
    """The model has a layer that cannot be computed privately."""


class OutOfRangeError(PrivateKerasError, ValueError):
    """A model could compute values beyond the fixed-point encoding's headroom, so its
    private answers could be wrong (see ``check_range``)."""


class InputError(PrivateKerasError, ValueError):
    """A query's input has the wrong shape, dtype, or values."""


class NotServingError(PrivateKerasError):
    """No model is being served on the cluster (or serving stopped)."""


class WorkerUnavailableError(PrivateKerasError):
    """A worker stopped answering during a query or while serving."""


class AccessDeniedError(PrivateKerasError):
    """A worker refused the call: no certificate of the cluster's CA, or a role that may not
    make it (a client calling an owner method, say)."""


class OwnerUnavailableError(PrivateKerasError):
    """The model owner's process stopped serving without withdrawing (died or hangs)."""


def class_chain(exc):
    """The names of ``exc``'s classes, most specific first (``BaseException`` and ``object``
    left out), and its qualified name: what R makes its condition classes of."""
    kind = type(exc)
    chain = [c.__name__ for c in kind.__mro__ if c not in (BaseException, object)]
    return chain, "{}.{}".format(kind.__module__, kind.__qualname__)


__all__ = [
    "PrivateKerasError",
    "ClusterError",
    "PortInUseError",
    "UnsupportedLayerError",
    "OutOfRangeError",
    "InputError",
    "NotServingError",
    "WorkerUnavailableError",
    "OwnerUnavailableError",
    "AccessDeniedError",
    "KernelsMissingError",
]
