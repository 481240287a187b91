"""Exceptions raised by privatekeras. Each message says what went wrong and how to fix it."""

from .kernels.loader import KernelsMissingError


class PrivateKerasError(Exception):
    """Base class of privatekeras' errors."""


class ClusterError(PrivateKerasError):
    """A cluster is misconfigured, or its workers failed to start or died."""


class PortInUseError(ClusterError):
    """A worker's port is already taken by another process (or another cluster)."""


class UnsupportedLayerError(PrivateKerasError, ValueError):
    """The model has a layer that cannot be computed privately."""


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


__all__ = [
    "PrivateKerasError",
    "ClusterError",
    "PortInUseError",
    "UnsupportedLayerError",
    "InputError",
    "NotServingError",
    "WorkerUnavailableError",
    "OwnerUnavailableError",
    "AccessDeniedError",
    "KernelsMissingError",
]
