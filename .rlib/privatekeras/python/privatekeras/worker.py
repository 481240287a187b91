"""A worker process: one TensorFlow gRPC server holding secret shares.

Started by :class:`privatekeras.Cluster` as ``python -m privatekeras.worker``; it loads the
secure kernels (refusing to start without them), starts its server, prints ``READY`` and
serves until it is terminated.
"""

import argparse
import os
import signal
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m privatekeras.worker")
    parser.add_argument("--hosts", required=True, help="comma-separated host:port of all workers")
    parser.add_argument("--index", type=int, required=True, help="this worker's position")
    parser.add_argument("--job", default="pk", help="TensorFlow job name of the cluster")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the one that started us) dies")
    args = parser.parse_args(argv)
    hosts = args.hosts.split(",")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # SIGTERM keeps its default action (terminate at once): a Python handler would never
    # run while the main thread waits inside the C++ server.
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    from .kernels import loader

    loader.load()  # the ops run here: without our CSPRNG kernels, refuse to serve
    import tensorflow as tf

    server = tf.distribute.Server(
        tf.train.ClusterSpec({args.job: hosts}),
        job_name=args.job,
        task_index=args.index,
        start=True,
    )
    print("READY {} {}".format(args.index, hosts[args.index]), flush=True)
    server.join()
    return 0


def _die_with_parent(parent_pid):
    """Ask Linux to SIGTERM us when our parent dies, so killed owners leave no workers."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
