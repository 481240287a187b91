"""Model owner for load, fault and access tests: serve until told to stop, survive worker
faults.

Prints machine-readable lines: WORKERS <pids>, SERVING, SERVED <n>, SERVE FAILED <type>
<seconds>: <message>, STOPPED, RESTARTED <pids>, SERVED AGAIN <n>. With --stop-file, stops
serving (SharedModel.stop()) when that file appears; without --num-requests it serves until
then.
"""
import argparse
import os
import sys
import threading
import time

import privatekeras as pk

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--model", required=True)
p.add_argument("--num-requests", type=int, default=None)
p.add_argument("--stop-file", default=None)
p.add_argument("--external", action="store_true", help="workers run already (not ours)")
p.add_argument("--max-group", type=int, default=1, help="queries evaluated together at most")
p.add_argument("--restart-after-fault", action="store_true",
               help="after a worker fault: stop, start the cluster again, serve 1 more query")
a = p.parse_args()

cluster = pk.Cluster(a.hosts.split(","), auto_managed=not a.external)


def watch_stop_file(shared):
    while not os.path.exists(a.stop_file):
        time.sleep(0.1)
    shared.stop()


def serve_once(num_requests):
    shared = pk.share(a.model, cluster, max_group=a.max_group)
    if a.stop_file:
        threading.Thread(target=watch_stop_file, args=(shared,), daemon=True).start()
    print("SERVING", flush=True)
    return shared.serve(num_requests=num_requests)


try:
    if not a.external:
        cluster.start()
        print("WORKERS", " ".join(map(str, cluster.pids)), flush=True)
    t0 = time.monotonic()
    try:
        print("SERVED", serve_once(a.num_requests), flush=True)
    except pk.WorkerUnavailableError as exc:
        print("SERVE FAILED {} {:.1f}: {}".format(type(exc).__name__, time.monotonic() - t0,
                                                  exc), flush=True)
        print("WORKER EXIT CODES", [p.poll() for p in cluster._procs], flush=True)
        for i in range(3):  # what the workers said (their logs go when the cluster stops)
            print("WORKER {} LOG:\n{}".format(i, cluster._worker_log(i, tail=4000)), flush=True)
        if not a.restart_after_fault:
            raise
        cluster.stop()
        print("STOPPED", flush=True)
        cluster.start()
        print("RESTARTED", " ".join(map(str, cluster.pids)), flush=True)
        print("SERVED AGAIN", serve_once(1), flush=True)
finally:
    if not a.external:
        cluster.stop()
sys.exit(0)
