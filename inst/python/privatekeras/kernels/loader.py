"""Load the compiled kernels and expose them under the names TFE calls."""

import os

from ..errors import KernelsMissingError  # a PrivateKerasError (defined there: no cycle)
from .build import ENV_VAR, default_library_path

_ops = None


def load():
    """Load the kernel library once per process and return the op module.

    Raises KernelsMissingError, saying how to build them, when the library is missing.
    """
    global _ops
    if _ops is not None:
        return _ops
    path = default_library_path()
    if not os.path.exists(path):
        raise KernelsMissingError(
            "privatekeras refuses to start: its secure kernels (ChaCha20 CSPRNG and ABY3 bit "
            "ops) are not built for this TensorFlow (looked for {}). Without them TF Encrypted "
            "would fall back to insecure randomness. Build them with "
            "`python -m privatekeras.kernels build` (needs g++ and libsodium-dev), run "
            "`make setup`, or from R `install_privatekeras()`; or point ${} at a built "
            "library.".format(path, ENV_VAR)
        )
    import tensorflow as tf

    _ops = tf.load_op_library(path)
    return _ops


def ops():
    """The loaded op module (loads it on first use)."""
    return load()


class SecureRandomModule:
    """TFE's ``secure_random_module`` interface, backed by our ChaCha20 kernels."""

    def __init__(self, module):
        self._m = module

    def secure_seed(self, name=None):
        return self._m.pk_secure_seed(name=name)

    def secure_seeded_random_uniform(self, shape, seed, minval, maxval, name=None):
        return self._m.pk_seeded_random_uniform(shape, seed, minval, maxval, name=name)

    def secure_random_uniform(self, shape, minval, maxval, name=None):
        return self._m.pk_random_uniform(shape, minval, maxval, name=name)

    def i128_secure_seeded_random_uniform(self, *args, **kwargs):
        raise NotImplementedError(
            "privatekeras uses ABY3's 64-bit fixed-point configuration; 128-bit ('high') "
            "precision is not supported"
        )

    i128_secure_random_uniform = i128_secure_seeded_random_uniform


class AuxModule:
    """TFE's ``aux_module`` interface (ABY3's bit ops), backed by our kernels."""

    def __init__(self, module):
        self._m = module

    def bit_gather(self, x, start, stride):
        return self._m.pk_bit_gather(x, start=start, stride=stride)

    def bit_split_and_gather(self, x, stride):
        return self._m.pk_bit_split_and_gather(x, stride=stride)

    def bit_reverse(self, x):
        return self._m.pk_bit_reverse(x)

    def xor_indices(self, x):
        return self._m.pk_xor_indices(x)
