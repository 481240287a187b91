"""privatekeras: private predictions from Keras models with three-party computation.

A model owner secret-shares a trained Keras model's weights among three workers, which serve
private predictions; a client secret-shares its input and alone reconstructs the logits. Only
the workers compute; owners and clients reach them through a small API with mutual TLS.
Importing this package does not import TensorFlow (a client needs only numpy and grpcio).

    import privatekeras as pk
    cluster = pk.Cluster(["localhost:4000", "localhost:4001", "localhost:4002"]).start()
    shared = pk.share(model, cluster)        # in the model owner's process
    shared.serve(num_requests=3)
    # in another process:
    client = pk.connect(cluster, input_shape=(1, 28, 28, 1), output_shape=(1, 10))
    logits = client.query(x)
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
# Before gRPC is imported: its fork handling restarts a poller thread in forked children,
# which then crashes on descriptors the child closes before exec (seen: 2-3 in 150 workers,
# stunnels, R's processx children); privatekeras never uses gRPC in a forked child.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from . import ckks, data  # noqa: E402
from .client import Client, connect  # noqa: E402
from .cluster import Cluster, Server  # noqa: E402
from .convert import check_range, convert, supported_layers  # noqa: E402
from .errors import (AccessDeniedError, ClusterError, InputError, KernelsMissingError,
                     NotServingError, OutOfRangeError, OwnerUnavailableError,
                     PortInUseError, PrivateKerasError, UnsupportedLayerError,
                     WorkerUnavailableError)  # noqa: E402
from .hook import KerasHook, TFECluster, TFEWorker  # noqa: E402
from .log import set_verbosity  # noqa: E402
from .owner import SharedModel, share  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Cluster", "Server", "share", "data", "ckks", "SharedModel", "connect", "Client", "convert",
    "check_range", "supported_layers",
    "KerasHook", "TFEWorker", "TFECluster", "secure_randomness_active",
    "PrivateKerasError", "ClusterError", "PortInUseError", "UnsupportedLayerError",
    "InputError", "OutOfRangeError", "NotServingError", "WorkerUnavailableError", "OwnerUnavailableError",
    "KernelsMissingError", "AccessDeniedError", "set_verbosity",
]


def secure_randomness_active():
    """True when TF Encrypted in this process draws randomness from our CSPRNG kernels (in
    worker 0, which builds the private step)."""
    from .mpc.tfe_compat import secure_randomness_active as active

    return active()
