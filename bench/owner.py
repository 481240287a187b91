"""The model owner's process of one benchmark configuration (this release).

Starts the three workers, secret-shares the model (which also has worker 0 trace the private
step and run it once), then (when run.py says SERVE) serves exactly the client's number of
queries, and writes the private step's run time of each query, as worker 0 reported it
(``SharedModel.step_seconds``), to STEPS_OUT (a JSON list of seconds, in query order).

    python bench/owner.py MODEL HOSTS PROTOCOL BATCH NUM_REQUESTS STEPS_OUT
"""

import json
import sys
import time

import child

child.die_with_parent()
import privatekeras as pk  # noqa: E402


def main():
    model_path, hosts, protocol = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    batch, num_requests, steps_out = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    t0 = time.monotonic()
    cluster = pk.Cluster(hosts).start()
    shared = None
    try:
        child.say("WORKERS", ",".join(map(str, cluster.pids)))
        t1 = time.monotonic()
        shared = pk.share(model_path, cluster, protocol=protocol, batch_size=batch)
        child.say("SHARED", "{:.3f}".format(t1 - t0), "{:.3f}".format(time.monotonic() - t1))
        child.wait_for("SERVE")
        child.say("SERVING")
        answered = shared.serve(num_requests=num_requests, idle_timeout=300)
        with open(steps_out, "w") as f:
            json.dump([float(s) for s in shared.step_seconds], f)
        child.say("SERVED", answered)
        if answered != num_requests:
            raise SystemExit("served {} of {} queries".format(answered, num_requests))
        child.wait_for("STOP")  # run.py has read the workers' socket counters
    finally:
        if shared is not None:
            shared.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
