"""Ops, rounds and messages of the private step, counted in one process (no cluster).

Traces the private step for a saved Keras model as the workers do (three workers' devices,
the messages between them routed over the mesh, :mod:`privatekeras.mpc.routing`; tracing
runs nothing, so no cluster is needed) and counts its graph (``privatekeras.mpc.graphstats``):
the figures ``make bench`` reads from worker 0. With ``--run N`` it also runs the step N
times with the three parties on three logical CPUs of this process
(``ABY3Engine.in_process``, shares of zero inputs) and reports the median wall and CPU time
(CPU-only figures: no network, one process). Prints one JSON line per batch size. This is
the quick way to see what a change to the engine buys.

    python bench/graph.py MODEL [--batches 1,32] [--run 5]
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "inst", "python"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batches", default="1")
    p.add_argument("--run", type=int, default=0, help="also time N executions")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
    from privatekeras.convert import convert
    from privatekeras.mpc import store
    from privatekeras.mpc.aby3 import ABY3Engine
    from privatekeras.owner import public_spec

    devices = ["/job:localhost/replica:0/task:0/device:CPU:{}".format(i) for i in range(3)]
    workers = ["/job:pk/replica:0/task:{}/device:CPU:0".format(i) for i in range(3)]
    spec = convert(a.model)
    for batch in [int(b) for b in a.batches.split(",")]:
        public = public_spec(spec, "aby3", batch, 1)
        t0 = time.monotonic()
        routed = ABY3Engine(workers, ["127.0.0.1:{}".format(4000 + i) for i in range(3)], "pk")
        out = dict(routed.build_step(public, 1).stats(), batch=batch,
                   trace_s=round(time.monotonic() - t0, 2))
        if a.run:
            engine = ABY3Engine.in_process(devices)
            step = engine.build_step(public, 1)
            for device in devices:  # zero weights: the counts and the timing do not care
                with tf.device(device):
                    for k, w in enumerate(spec.weights):
                        for j in range(store.SHARES):
                            tf.raw_ops.AssignVariableOp(
                                resource=store.weight(public["model_id"], k, j, w.shape),
                                value=tf.zeros(w.shape, tf.int64))
            rows = [np.zeros([step.group, step.in_width], np.int64)] * 3
            step(rows)
            times, cpu = [], []
            for _ in range(a.run):
                t, c = time.perf_counter(), time.process_time()
                step(rows)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            out["run_median_ms"] = round(1e3 * float(np.median(times)), 2)
            # CPU time of all threads of the process per step: less sensitive to other load
            out["cpu_median_ms"] = round(1e3 * float(np.median(cpu)), 2)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
