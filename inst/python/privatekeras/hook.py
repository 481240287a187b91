"""Syft-compatible facade, so the 2020 "encrypted deep learning with Syft and Keras" scripts
run with only their import line changed::

    hook = KerasHook(tf.keras)                     # adds share / serve / stop to Keras models
    alice = TFEWorker(host="localhost:4000", auto_managed=True)   # ... bob, carol
    cluster = TFECluster(alice, bob, carol); cluster.start()
    model.share(cluster); model.serve(num_requests=3); model.stop(); cluster.stop()

    client = TFEWorker()                           # in the client's process
    client.connect_to_model(input_shape, output_shape, cluster)
    logits = client.query_model(image)
"""

import warnings
import weakref

from .client import connect
from .cluster import Cluster
from .owner import share

_shared = weakref.WeakKeyDictionary()


def _shared_of(model):
    try:
        return _shared[model]
    except KeyError:
        raise RuntimeError("this model is not shared yet: call model.share(cluster) "
                           "first") from None


def _model_share(self, cluster, protocol="aby3", batch_size=None, input_range=None):
    """Secret-share this model's weights onto ``cluster`` (a TFECluster or Cluster); see
    :func:`privatekeras.share` for ``input_range``."""
    cluster = cluster.cluster if isinstance(cluster, TFECluster) else cluster
    _shared[self] = share(self, cluster, protocol=protocol, batch_size=batch_size,
                          input_range=input_range)
    return self


def _model_serve(self, num_requests=5):
    """Serve private predictions of this shared model (Syft's default: 5 requests)."""
    return _shared_of(self).serve(num_requests=num_requests)


def _model_stop(self):
    """Stop serving this shared model."""
    if self in _shared:
        _shared[self].stop()
    return self


def _accept_batch_input_shape(keras_module):
    """Let Keras 3 layers take Keras 2's ``batch_input_shape=`` (as the tutorial passes it).

    It becomes ``input_shape=`` plus a remembered batch size, which :func:`share` uses.
    """
    layer_cls = getattr(getattr(keras_module, "layers", None), "Layer", None)
    if layer_cls is None or getattr(layer_cls.__init__, "_privatekeras_hook", False):
        return
    if not str(getattr(keras_module, "__version__", "3")).startswith("3"):
        return  # Keras 2 understands batch_input_shape itself
    original = layer_cls.__init__

    def __init__(self, *args, **kwargs):
        batch_input_shape = kwargs.pop("batch_input_shape", None)
        if batch_input_shape is not None:
            kwargs.setdefault("input_shape", tuple(batch_input_shape[1:]))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input_shape.*")
                original(self, *args, **kwargs)
            self._privatekeras_batch_size = batch_input_shape[0]
        else:
            original(self, *args, **kwargs)

    __init__._privatekeras_hook = True
    layer_cls.__init__ = __init__


class KerasHook:
    """Adds ``share``, ``serve`` and ``stop`` to the Model class of a Keras module.

    Accepts ``tf.keras``, ``keras`` (Keras 3) or ``tf_keras``. Like Syft's, create it right
    after import, before building the model: on Keras 3 it also makes layers accept the
    tutorial's ``batch_input_shape=`` argument.
    """

    def __init__(self, keras_module):
        model_cls = getattr(keras_module, "Model", None)
        if model_cls is None and hasattr(keras_module, "models"):
            model_cls = getattr(keras_module.models, "Model", None)
        if model_cls is None:
            raise TypeError("KerasHook expects a Keras module (e.g. tf.keras), got {!r}".format(
                keras_module))
        self.keras = keras_module
        self.model_class = model_cls
        model_cls.share = _model_share
        model_cls.serve = _model_serve
        model_cls.stop = _model_stop
        _accept_batch_input_shape(keras_module)


class TFEWorker:
    """A worker address (``host``) or, without a host, the client that queries a model."""

    def __init__(self, host=None, auto_managed=True):
        self.host = host
        self.auto_managed = bool(auto_managed)
        self._client = None

    def __repr__(self):
        return "<TFEWorker {}>".format(self.host or "client")

    def connect_to_model(self, input_shape, output_shape, cluster, timeout=60.0):
        """Connect this client to the model served on ``cluster``."""
        cluster = cluster.cluster if isinstance(cluster, TFECluster) else cluster
        self._client = connect(cluster, input_shape, output_shape, timeout=timeout)
        return self

    def query_model(self, x):
        """Private prediction: the logits for ``x``, reconstructed here."""
        if self._client is None:
            raise RuntimeError("call connect_to_model(input_shape, output_shape, cluster) "
                               "first")
        return self._client.query(x)


class TFECluster:
    """Three TFEWorkers forming a cluster; ``start()`` spawns auto-managed workers."""

    def __init__(self, *workers):
        if len(workers) == 1 and isinstance(workers[0], (list, tuple)):
            workers = tuple(workers[0])
        hosts = [getattr(w, "host", w) for w in workers]
        if any(h is None for h in hosts):
            raise ValueError("every worker of a cluster needs a host, e.g. "
                             "TFEWorker(host='localhost:4000')")
        self.workers = workers
        self.cluster = Cluster(hosts, auto_managed=all(getattr(w, "auto_managed", True)
                                                       for w in workers))

    def __repr__(self):
        return "<TFECluster {}>".format(self.cluster)

    def start(self):
        self.cluster.start()
        return self

    def stop(self):
        self.cluster.stop()
        return self
