"""Compile ``pk_ops.cc`` against the installed TensorFlow and libsodium."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "pk_ops.cc")
LOOPBACK_SOURCE = os.path.join(HERE, "pk_loopback.c")
ENV_VAR = "PRIVATEKERAS_KERNELS"


def _source_digest():
    digest = hashlib.sha256()
    for path in (SOURCE, LOOPBACK_SOURCE):
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
    """The directory holding ``pk_ops.so`` and ``pk_loopback.so``."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    name = "tf{}-{}".format(_tf_version(), _source_digest())
    return os.path.join(sys.prefix, "share", "privatekeras", name)


def loopback_library_path():
    """The bind() interposer preloaded into workers that must listen on loopback only."""
    return os.path.join(library_dir(), "pk_loopback.so")


def find_library():
    """The path of the compiled kernels, or None when they have not been built."""
    path = default_library_path()
    return path if os.path.exists(path) else None


def build(output=None, verbose=True):
    """Compile the kernels (and the loopback interposer) and return the kernel library path.

    Needs a C++ compiler and libsodium's headers (Debian: ``g++ libsodium-dev``).
    """
    import tensorflow as tf

    output = output or default_library_path()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found: install g++ (Debian: apt-get install g++)")
    if not os.path.exists("/usr/include/sodium.h") and not _pkg_config_has("libsodium"):
        raise RuntimeError(
            "libsodium headers not found: install them (Debian: apt-get install libsodium-dev)"
        )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(output))
    os.close(fd)
    cmd = (
        [compiler, "-std=c++17", "-shared", "-fPIC", "-O2", SOURCE, "-o", tmp]
        + tf.sysconfig.get_compile_flags()
        + tf.sysconfig.get_link_flags()
        + ["-lsodium"]
    )
    if verbose:
        print("privatekeras: compiling secure kernels for TensorFlow {} ...".format(tf.__version__),
              flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError("compiling the secure kernels failed:\n" + proc.stderr[-4000:])
    loopback = os.path.join(os.path.dirname(output), "pk_loopback.so")
    proc = subprocess.run(
        [compiler, "-x", "c", "-shared", "-fPIC", "-O2", LOOPBACK_SOURCE, "-o", loopback, "-ldl"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError("compiling the loopback interposer failed:\n" + proc.stderr[-4000:])
    os.replace(tmp, output)
    if verbose:
        print("privatekeras: secure kernels written to {}".format(output), flush=True)
    return output


def _pkg_config_has(name):
    exe = shutil.which("pkg-config")
    if exe is None:
        return False
    return subprocess.run([exe, "--exists", name]).returncode == 0

