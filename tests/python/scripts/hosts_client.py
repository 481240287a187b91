"""Client on its own host: query the model served on the workers of a hosts file.

Queries every image of ``--images`` one at a time and saves the logits to ``--out`` (.npy)
and ``<out>.json``: per-query seconds, this host's listening sockets, whether TensorFlow was
imported. Prints ``ANSWERED <n>``. With ``--then-wait``, it then prints ``WAITING``, waits
for a line on stdin and queries once more, printing ``ANSWERED`` again or ``ERROR <seconds>
<exception class> <message>`` (seconds: how long that query took to fail).
"""
import argparse
import json
import sys
import time

import numpy as np

import privatekeras as pk

from netinfo import listening, listening6

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--name", required=True)
p.add_argument("--images", required=True)
p.add_argument("--out", required=True, help=".npy for the logits; timings go to <out>.json")
p.add_argument("--timeout", type=float, default=180.0)
p.add_argument("--then-wait", action="store_true")
a = p.parse_args()

cluster = pk.Cluster.from_config(a.config, a.name)
client = pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=a.timeout)
x = np.load(a.images)
logits, seconds = [], []
for i in range(len(x)):
    t = time.perf_counter()
    logits.append(client.query(x[i:i + 1]))
    seconds.append(time.perf_counter() - t)
np.save(a.out, np.concatenate(logits))
with open(a.out + ".json", "w") as f:
    json.dump({"seconds": seconds, "listening": listening() + listening6(),
               "tensorflow_imported": "tensorflow" in sys.modules}, f)
print("ANSWERED", len(x), flush=True)
if a.then_wait:
    print("WAITING", flush=True)
    sys.stdin.readline()
    t = time.monotonic()
    try:
        client.query(x[:1])
        print("ANSWERED", len(x) + 1, flush=True)
    except pk.PrivateKerasError as exc:
        print("ERROR {:.2f} {} {}".format(time.monotonic() - t, type(exc).__name__, exc),
              flush=True)
client.close()
