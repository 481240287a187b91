"""Compile the kernels against the installed TensorFlow and libsodium.

One library directory (see :func:`library_dir`) holds three libraries:

- ``pk_ops.so`` (from ``pk_ops.cc``, ``pk_ring.cc``, ``pk_fused.cc``, ``pk_trunc.cc`` and
  ``pk_mesh.cc``): the production kernels (CSPRNG, ABY3's bit ops, the ring GEMM and
  convolution, the fused carry circuit, ReLU's selection, the truncation and the mesh
  transport's send and receive, with its C API for :mod:`privatekeras.kernels.mesh`),
  loaded in every worker;
- ``pk_loopback.so`` (from ``pk_loopback.c``): the bind() interposer preloaded into processes
  that must listen on loopback only;
- ``pk_test_ops.so`` (from ``pk_test_ops.cc``): test-only ops (the raw ChaCha20 keystream),
  loaded by the tests alone, never by production code.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from ..log import say

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "pk_ops.cc")
RING_SOURCE = os.path.join(HERE, "pk_ring.cc")  # compiled into the same library
FUSED_SOURCE = os.path.join(HERE, "pk_fused.cc")  # likewise
TRUNC_SOURCE = os.path.join(HERE, "pk_trunc.cc")  # likewise
MESH_SOURCE = os.path.join(HERE, "pk_mesh.cc")  # likewise
COMMON_HEADER = os.path.join(HERE, "pk_common.h")  # included by every kernel file
LOOPBACK_SOURCE = os.path.join(HERE, "pk_loopback.c")
TEST_SOURCE = os.path.join(HERE, "pk_test_ops.cc")
ENV_VAR = "PRIVATEKERAS_KERNELS"


def _source_digest():
    digest = hashlib.sha256()
    for path in (SOURCE, RING_SOURCE, FUSED_SOURCE, TRUNC_SOURCE, MESH_SOURCE, COMMON_HEADER,
                 LOOPBACK_SOURCE, TEST_SOURCE):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _tf_version():
    # Read the version without importing TensorFlow (slow) where possible.
    try:
        from importlib.metadata import version

        for dist in ("tensorflow-cpu", "tensorflow"):
            try:
                return version(dist)
            except Exception:  # noqa: BLE001 - try the next distribution name
                continue
    except ImportError:  # pragma: no cover
        pass
    import tensorflow as tf

    return tf.__version__


def default_library_path():
    """Where the compiled kernels for this interpreter and TensorFlow version live.

    ``$PRIVATEKERAS_KERNELS`` (a directory) overrides it. The default is inside the Python
    environment (``<prefix>/share/privatekeras/tf<version>-<digest>/pk_ops.so``), keyed by
    TensorFlow version and source digest, so a TensorFlow upgrade or a kernel change never
    loads a stale library.
    """
    return os.path.join(library_dir(), "pk_ops.so")


def library_dir():
    """The directory holding ``pk_ops.so``, ``pk_loopback.so`` and ``pk_test_ops.so``."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    name = "tf{}-{}".format(_tf_version(), _source_digest())
    return os.path.join(sys.prefix, "share", "privatekeras", name)


def loopback_library_path():
    """The bind() interposer preloaded into workers that must listen on loopback only."""
    return os.path.join(library_dir(), "pk_loopback.so")


def test_library_path():
    """The test-only op library (``PkChacha20Keystream``, the raw ChaCha20 keystream under a
    caller-chosen key), for the tests' ``tf.load_op_library``. Production code never loads
    it."""
    return os.path.join(library_dir(), "pk_test_ops.so")


def find_library():
    """The path of the compiled kernels, or None when they have not been built."""
    path = default_library_path()
    return path if os.path.exists(path) else None


def build(output=None, verbose=True):
    """Compile the kernels, the loopback interposer and the test-only ops; return the kernel
    library path.

    ``pk_loopback.so`` and ``pk_test_ops.so`` are written next to ``output``. Every library is
    compiled to a temporary file first; ``pk_ops.so`` is put in place last, so once
    :func:`find_library` sees it the other two are there as well. Needs a C++ compiler and
    libsodium's headers (Debian: ``g++ libsodium-dev``).
    """
    import tensorflow as tf

    output = output or default_library_path()
    directory = os.path.dirname(output)
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found: install g++ (Debian: apt-get install g++)")
    if not os.path.exists("/usr/include/sodium.h") and not _pkg_config_has("libsodium"):
        raise RuntimeError(
            "libsodium headers not found: install them (Debian: apt-get install libsodium-dev)"
        )
    os.makedirs(directory, exist_ok=True)
    tf_flags = tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags()
    jobs = [  # (what, source, final path, arguments before the source, arguments at the end)
        ("the loopback interposer", LOOPBACK_SOURCE, os.path.join(directory, "pk_loopback.so"),
         [compiler, "-x", "c", "-shared", "-fPIC", "-O2", "-pthread"], ["-ldl"]),
        ("the test-only ops", TEST_SOURCE, os.path.join(directory, "pk_test_ops.so"),
         [compiler, "-std=c++17", "-shared", "-fPIC", "-O2"], tf_flags + ["-lsodium"]),
        # The ring kernels pick AVX-512 / AVX2 / portable code at run time (target attributes,
        # __builtin_cpu_supports): no -march flag, so the library runs on any x86-64.
        ("the secure kernels", [SOURCE, RING_SOURCE, FUSED_SOURCE, TRUNC_SOURCE, MESH_SOURCE],
         output,
         [compiler, "-std=c++17", "-shared", "-fPIC", "-O2"], tf_flags + ["-lsodium"]),
    ]
    if verbose:
        say("compiling secure kernels for TensorFlow %s ...", tf.__version__)
    built = []
    try:
        for what, source, final, head, tail in jobs:
            sources = source if isinstance(source, list) else [source]
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            built.append((tmp, final))
            proc = subprocess.run(head + sources + ["-o", tmp] + tail, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise RuntimeError("compiling {} failed:\n{}".format(what, proc.stderr[-4000:]))
            # mkstemp made the file 0600; a library other users' processes load (or preload)
            # must be readable by them.
            os.chmod(tmp, 0o755)
        for tmp, final in built:
            os.replace(tmp, final)
    finally:
        for tmp, _ in built:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if verbose:
        say("secure kernels written to %s", output)
    return output


def _pkg_config_has(name):
    exe = shutil.which("pkg-config")
    if exe is None:
        return False
    return subprocess.run([exe, "--exists", name]).returncode == 0

