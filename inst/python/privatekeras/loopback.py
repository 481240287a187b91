"""Run a process whose TensorFlow servers listen on loopback only.

TensorFlow's gRPC server binds its port on every network interface, and it executes any
graph sent to it without authentication. Workers started by :class:`privatekeras.Cluster`
or ``python -m privatekeras.worker`` are confined to loopback by preloading the bind()
interposer ``pk_loopback.so``. The model owner's and clients' processes also start a
TensorFlow server when they connect (``/job:localhost``); run them through this module to
confine it as well::

    python -m privatekeras.loopback python owner.py --config hosts.toml

This replaces the current process with the command, with the interposer preloaded.
"""

import os
import sys
import warnings

SHIM_NAME = "pk_loopback.so"


def loopback_active():
    """True when the loopback interposer is loaded into this process (so any TensorFlow
    server it starts listens on 127.0.0.1 only)."""
    try:
        with open("/proc/self/maps") as f:
            return any(line.rstrip().endswith("/" + SHIM_NAME) for line in f)
    except OSError:  # pragma: no cover - not Linux
        return False


def loopback_env():
    """A copy of this process's environment that preloads the loopback interposer (and puts
    privatekeras on PYTHONPATH). Raises KernelsMissingError when it has not been built."""
    from .cluster import _child_env

    return _child_env(loopback_only=True)


def warn_if_exposed(name):
    """Warn that this process's own TensorFlow server will listen on all interfaces."""
    msg = ("party {!r}: this process is not confined to loopback, so the TensorFlow server it "
           "starts when it connects will listen on ALL network interfaces, where anyone who "
           "reaches it can run graphs in this process. Start it as `python -m "
           "privatekeras.loopback python YOUR_SCRIPT.py ...` (see docs/security.md)".format(name))
    print("privatekeras: WARNING: " + msg, file=sys.stderr, flush=True)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def main(argv=None):
    """``python -m privatekeras.loopback COMMAND [ARGS...]``: exec COMMAND confined to
    loopback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m privatekeras.loopback COMMAND [ARGS...]\n\n" + __doc__.strip())
        return 0 if argv else 2
    env = loopback_env()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print("privatekeras.loopback: cannot run {!r}: {}".format(argv[0], exc), file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
