"""Keeping a worker's TensorFlow server on loopback.

TensorFlow's gRPC server binds its port on every interface and runs any graph sent to it, so
a worker's compute port must be reachable by the other workers only. On one machine that is
loopback; across hosts, the stunnel links re-create the peers' compute ports on each host's
loopback. A worker process runs with the bind() interposer ``pk_loopback.so`` preloaded and
``PRIVATEKERAS_CONFINE_PORTS`` naming its compute port: binds to that port can only be
loopback binds (the wildcard becomes 127.0.0.1, anything else is refused), while its API
server may bind a public address. After start-up the worker checks what actually listens
(:func:`privatekeras.deploy.listening.check_confined`).
"""

import os
import sys

SHIM_NAME = "pk_loopback.so"


def interposer_active():
    """True when the loopback interposer is loaded into this process."""
    try:
        with open("/proc/self/maps") as f:
            return any(line.rstrip().endswith("/" + SHIM_NAME) for line in f)
    except OSError:  # pragma: no cover - not Linux
        return False


def interposer_env(base=None):
    """A copy of the environment (default: this process's) for a worker process: the
    interposer preloaded, privatekeras on PYTHONPATH, and the interpreter's own lib directory
    first on LD_LIBRARY_PATH (R puts the system's there, which makes a non-system Python load
    the wrong libpython). Raises KernelsMissingError when the interposer is not built."""
    from ..kernels.build import loopback_library_path
    from ..kernels.loader import KernelsMissingError

    env = dict(os.environ if base is None else base)
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [package_parent, env.get("PYTHONPATH", "")] if p)
    libdir = os.path.join(sys.base_prefix, "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    shim = loopback_library_path()
    if not os.path.exists(shim):
        raise KernelsMissingError("the loopback interposer {} is missing: run `python -m "
                                  "privatekeras.kernels build`".format(shim))
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and
               not p.endswith("/" + SHIM_NAME)]
    env["LD_PRELOAD"] = ":".join([shim] + preload)
    return env
