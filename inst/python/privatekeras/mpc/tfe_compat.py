"""Import TF Encrypted 0.9.1 on stock TensorFlow, with privatekeras' secure kernels.

TFE 0.9.1 was built against a patched TensorFlow: ABY3 imports ``glob_stateful_parallelism``
from ``while_v2`` and passes ``stateful_parallelism=`` to ``_build_while_op``; Pond's pooling
uses the TF1-only ``tf.Dimension``. We add those names before importing TFE, then replace its
``secure_random`` and ``aux`` op modules (which it could not load) with our own kernels.

Only worker 0, which builds the private step, imports TF Encrypted; every worker loads the
kernels (the ops run on all three).
"""

import functools
import logging
import os
import warnings

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


@functools.lru_cache(maxsize=None)
def import_tfe():
    """Return the ``tf_encrypted`` module, patched and running on our secure kernels.

    Raises ``privatekeras.kernels.KernelsMissingError`` when the kernels are not built:
    privatekeras never runs on insecure randomness.
    """
    from ..kernels import loader

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

    tfe_secure_random.secure_random_module = loader.SecureRandomModule(module)
    tfe_aux.aux_module = loader.AuxModule(module)
    import tf_encrypted.operations.aux as aux_pkg

    aux_pkg.aux_module = tfe_aux.aux_module
    if not tfe_secure_random.supports_secure_randomness():  # pragma: no cover - invariant
        raise RuntimeError("secure randomness is not active; refusing to continue")
    return tfe


def secure_randomness_active():
    """True when TFE draws all its randomness from privatekeras' CSPRNG kernels."""
    if import_tfe.cache_info().currsize == 0:
        return False
    from tf_encrypted.operations.secure_random import secure_random as tfe_secure_random
    from ..kernels.loader import SecureRandomModule

    return tfe_secure_random.supports_secure_randomness() and isinstance(
        tfe_secure_random.secure_random_module, SecureRandomModule
    )
