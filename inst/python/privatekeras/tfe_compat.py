"""Import TF Encrypted 0.9.1 on stock TensorFlow, with privatekeras' secure kernels.

TFE 0.9.1 was built against a patched TensorFlow: ABY3 imports ``glob_stateful_parallelism``
from ``while_v2`` and passes ``stateful_parallelism=`` to ``_build_while_op``; Pond's pooling
uses the TF1-only ``tf.Dimension``. We add those names before importing TFE, then replace its
``secure_random`` and ``aux`` op modules (which it could not load) with our own kernels, and
correct SecureNN's max-pool strides.

Every process that runs secure ops (model owner, clients and each worker) goes through
``import_tfe()``, so the kernels are registered wherever the ops are placed.
"""

import logging
import os
import warnings

_tfe = None


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="tf_encrypted")
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")


def _patch_tensorflow(tf):
    from tensorflow.python.ops import while_v2

    if not hasattr(while_v2, "glob_stateful_parallelism"):
        while_v2.glob_stateful_parallelism = False
    build = while_v2._build_while_op
    if not getattr(build, "_privatekeras_shim", False):

        def _build_while_op(*args, stateful_parallelism=None, **kwargs):
            return build(*args, **kwargs)

        _build_while_op._privatekeras_shim = True
        while_v2._build_while_op = _build_while_op
    if not hasattr(tf, "Dimension"):
        tf.Dimension = int


def import_tfe():
    """Return the ``tf_encrypted`` module, patched and running on our secure kernels.

    Raises ``privatekeras.kernels.KernelsMissingError`` when the kernels are not built:
    privatekeras never runs on insecure randomness.
    """
    global _tfe
    if _tfe is not None:
        return _tfe
    from .kernels import loader

    _quiet_tensorflow()
    module = loader.load()  # refuse before TFE can fall back to tf.random
    import tensorflow as tf

    _patch_tensorflow(tf)
    tfe_logger = logging.getLogger("tf_encrypted")
    level = tfe_logger.level
    # TFE warns that it falls back to insecure randomness when its own ops are missing; we
    # replace those ops right below, before any randomness is drawn.
    tfe_logger.setLevel(logging.CRITICAL)
    try:
        import tf_encrypted as tfe
        from tf_encrypted.operations.aux import aux as tfe_aux
        from tf_encrypted.operations.secure_random import secure_random as tfe_secure_random
    finally:
        tfe_logger.setLevel(level)

    _fix_securenn_maxpool()
    tfe_secure_random.secure_random_module = loader.SecureRandomModule(module)
    tfe_aux.aux_module = loader.AuxModule(module)
    import tf_encrypted.operations.aux as aux_pkg

    aux_pkg.aux_module = tfe_aux.aux_module
    if not tfe_secure_random.supports_secure_randomness():  # pragma: no cover - invariant
        raise RuntimeError("secure randomness is not active; refusing to continue")
    _tfe = tfe
    return tfe


def _fix_securenn_maxpool():
    """SecureNN's max-pool im2col passes ``strides[0]`` (an int) where a pair is expected,
    which fails, and would ignore the second stride. Use both strides."""
    import tensorflow as tf
    from tf_encrypted.protocol.securenn import securenn
    from tf_encrypted.tensor.shared import out_size

    def _im2col(prot, x, pool_size, strides, padding):
        batch, channels, height, width = x.shape
        out_height, out_width = out_size([int(height), int(width)], pool_size, strides, padding)
        patches = []
        for device, share in zip((prot.server_0.device_name, prot.server_1.device_name),
                                 x.unwrapped):
            with tf.device(device):
                split = share.reshape((batch * channels, 1, height, width))
                patches.append(split.im2col(pool_size[0], pool_size[1], list(strides), padding))
        return patches[0], patches[1], [out_height, out_width, int(batch), int(channels)]

    securenn._im2col = _im2col


def secure_randomness_active():
    """True when TFE draws all its randomness from privatekeras' CSPRNG kernels."""
    if _tfe is None:
        return False
    from tf_encrypted.operations.secure_random import secure_random as tfe_secure_random
    from .kernels.loader import SecureRandomModule

    return tfe_secure_random.supports_secure_randomness() and isinstance(
        tfe_secure_random.secure_random_module, SecureRandomModule
    )
