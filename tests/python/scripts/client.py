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
a = p.parse_args()

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
    # Nothing was lost or left on the workers: the next good query gets its own answer.
    report["after"] = client.query(good).tolist()
    with open(a.out, "w") as f:
        json.dump(report, f)
print("CLIENT DONE", flush=True)
