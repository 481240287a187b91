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
    parser.add_argument("--hosts", help="comma-separated host:port of all workers")
    parser.add_argument("--index", type=int, help="this worker's position")
    # Separate hosts: read --hosts/--index/--job from a hosts file (privatekeras.hosts).
    parser.add_argument("--config", help="hosts file (TOML) listing the workers")
    parser.add_argument("--name", help="this worker's name in the hosts file")
    parser.add_argument("--job", default="pk", help="TensorFlow job name of the cluster")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the one that started us) dies")
    args = parser.parse_args(argv)
    if args.config:  # workers on separate hosts, linked by privatekeras.tunnel
        if not args.name:
            parser.error("--config needs --name (this worker's name in the hosts file)")
        from .hosts import worker_args

        hosts, args.index, args.job = worker_args(args.config, args.name)
    elif args.hosts is None or args.index is None:
        parser.error("give --hosts and --index, or --config and --name")
    else:
        hosts = args.hosts.split(",")
    _confine_to_loopback(hosts, argv)

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


def _confine_to_loopback(hosts, argv):
    """Re-execute this worker with the loopback interposer preloaded when every worker
    address is a loopback one but the interposer is not loaded yet (a worker started by hand
    rather than by Cluster.start()): TensorFlow would otherwise listen on all interfaces."""
    from .cluster import is_loopback, parse_host
    from .loopback import loopback_active, loopback_env

    if loopback_active() or not all(is_loopback(parse_host(h)[0]) for h in hosts):
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    env = loopback_env()
    env["PRIVATEKERAS_WORKER_REEXEC"] = "1"
    if os.environ.get("PRIVATEKERAS_WORKER_REEXEC"):  # the preload did not take: refuse
        raise SystemExit("privatekeras.worker: cannot confine this worker to loopback "
                         "(LD_PRELOAD={!r} was not loaded)".format(env.get("LD_PRELOAD")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "privatekeras.worker"] + argv, env)


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
