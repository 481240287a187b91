"""Client process for the end-to-end tests: query a served model, save logits or errors."""
import argparse
import json

import numpy as np

import privatekeras as pk

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--images", required=True, help=".npy file of inputs")
p.add_argument("--out", required=True, help="where to save logits (.npy) or report (.json)")
p.add_argument("--input-shape", required=True)
p.add_argument("--output-shape", required=True)
p.add_argument("--rows-per-query", type=int, default=1)
p.add_argument("--mode", choices=["query", "bad"], default="query")
p.add_argument("--timeout", type=float, default=180)
p.add_argument("--start-after", default=None, metavar="FILE",
               help="connect only once FILE exists (waits up to --timeout seconds)")
p.add_argument("--record", default=None, metavar="DIR",
               help="save the shares sent to and received from each worker (ABY3 only; "
                    "test instrumentation)")
a = p.parse_args()


def record_shares(directory):
    """Wrap the ABY3 layout: save the encoded input and the shares each worker receives,
    and the output shares each worker returns and their sum (the encoded answer). Prints
    RECORD markers with the CLOCK_MONOTONIC time (shared by all processes) so the test can
    time the query."""
    import os
    import time

    from privatekeras.backends import ABY3Layout

    os.makedirs(directory, exist_ok=True)
    split, reconstruct = ABY3Layout.split.__func__, ABY3Layout.reconstruct.__func__

    def save(name, value):
        np.save(os.path.join(directory, name + ".npy"), value)

    def recording_split(cls, x):
        per_worker = split(cls, x)
        save("input_encoded", cls.encode(x))
        for i, (a_, b_) in enumerate(per_worker):
            save("input_w{}_a".format(i), a_)
            save("input_w{}_b".format(i), b_)
        print("RECORD SPLIT {:.6f}".format(time.monotonic()), flush=True)
        return per_worker

    def recording_reconstruct(cls, per_worker):
        print("RECORD RECONSTRUCT {:.6f}".format(time.monotonic()), flush=True)
        for i, (a_, b_) in enumerate(per_worker):
            save("output_w{}_a".format(i), a_)
            save("output_w{}_b".format(i), b_)
        with np.errstate(over="ignore"):
            save("output_encoded", per_worker[0][0] + per_worker[1][0] + per_worker[2][0])
        return reconstruct(cls, per_worker)

    ABY3Layout.split = classmethod(recording_split)
    ABY3Layout.reconstruct = classmethod(recording_reconstruct)


if a.record:
    record_shares(a.record)

if a.start_after:
    import os
    import time

    deadline = time.monotonic() + a.timeout
    while not os.path.exists(a.start_after):
        if time.monotonic() > deadline:
            raise SystemExit("{} did not appear within {:g} s".format(a.start_after, a.timeout))
        time.sleep(0.05)

shape = lambda s: tuple(int(d) for d in s.split(","))  # noqa: E731
cluster = pk.Cluster(a.hosts.split(","), auto_managed=False)
client = pk.connect(cluster, shape(a.input_shape), shape(a.output_shape), timeout=a.timeout)
x = np.load(a.images)

if a.mode == "query":
    k = a.rows_per_query
    out = np.concatenate([client.query(x[i:i + k]) for i in range(0, len(x), k)])
    np.save(a.out, out)
else:
    good = x[:1]
    bad = {
        "wrong_shape": np.zeros((1, 27, 28, 1)),
        "wrong_rank": np.zeros((28, 28)),
        "string_dtype": np.array([["a"] * 28] * 28)[None, :, :, None],
        "bool_dtype": np.zeros((1, 28, 28, 1), dtype=bool),
        "nan": np.where(np.arange(784).reshape(1, 28, 28, 1) == 5, np.nan, good),
        "inf": np.where(np.arange(784).reshape(1, 28, 28, 1) == 5, np.inf, good),
        "huge": good * 1e6,
        "empty_batch": np.zeros((0, 28, 28, 1)),
    }
    report = {}
    for name, value in bad.items():
        try:
            client.query(value)
            report[name] = {"error": None}
        except Exception as exc:  # noqa: BLE001 - the test inspects type and message
            report[name] = {"error": type(exc).__name__, "message": str(exc)}
    # Nothing was lost or left in the queues: the next good query gets its own answer.
    report["after"] = client.query(good).tolist()
    with open(a.out, "w") as f:
        json.dump(report, f)
print("CLIENT DONE", flush=True)
