"""Import TenSEAL so that it keeps its own protobuf.

TenSEAL's extension carries its own copy of protobuf (it serializes contexts and ciphertexts
with it). TensorFlow loads its libraries with ``RTLD_GLOBAL``, so in a process that imported
TensorFlow first (a Keras user, an R session with keras3), the dynamic linker would resolve
TenSEAL's protobuf symbols to TensorFlow's copy and serialization fails ("failed to save
proto"). Loading TenSEAL with ``RTLD_DEEPBIND`` makes it prefer its own symbols, in either
import order.
"""

import os
import sys

_module = None


def tenseal():
    """The ``tenseal`` module, imported once with ``RTLD_DEEPBIND`` (when not imported yet)."""
    global _module
    if _module is None:
        if "tenseal" in sys.modules:
            _module = sys.modules["tenseal"]
        else:
            flags = sys.getdlopenflags()
            sys.setdlopenflags(flags | getattr(os, "RTLD_DEEPBIND", 0))
            try:
                import tenseal as ts
            except ImportError as exc:
                raise ImportError(
                    "the CKKS backend needs TenSEAL (pip install tenseal==0.3.18; "
                    "install_privatekeras() in R installs it): {}".format(exc)) from None
            finally:
                sys.setdlopenflags(flags)
            _module = ts
    return _module
