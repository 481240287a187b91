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
    args = parser.parse_args(argv)
    hosts = args.hosts.split(",")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
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


if __name__ == "__main__":
    sys.exit(main())
