"""privatekeras' secure kernels: a ChaCha20 CSPRNG and ABY3's bit ops (``pk_ops.cc``), ring
products and convolutions mod 2^64 (``pk_ring.cc``), the fused carry circuit of ABY3's
bit decomposition (``pk_fused.cc``), the fused truncation (``pk_trunc.cc``) and the mesh
transport between the workers (``pk_mesh.cc``; its Python side is :mod:`.mesh`), all in one
library.

TFE 0.9.1 ships its custom ops only for TF 2.9.1, which has no Python 3.11 wheel. We compile
our own kernels (``pk_ops.cc``, next to this file) against the installed TensorFlow and plug
them into TFE's ``secure_random`` and ``aux`` interfaces. Without them TFE would silently fall
back to ``tf.random`` (not a CSPRNG), so privatekeras refuses to start instead.

Build once per TensorFlow version::

    python -m privatekeras.kernels build
"""

from .build import (build, default_library_path, find_library, loopback_library_path,
                    test_library_path)
from .loader import KernelsMissingError, load, ops

__all__ = ["build", "default_library_path", "find_library", "loopback_library_path",
           "test_library_path", "load", "ops", "KernelsMissingError"]
