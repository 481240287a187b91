"""Client on a separate host: query the model served on the workers of a hosts file."""
import argparse
import json
import time

import numpy as np

import privatekeras as pk

from netinfo import listening

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--name", required=True)
p.add_argument("--images", required=True)
p.add_argument("--out", required=True, help=".npy for the logits; timings go to <out>.json")
a = p.parse_args()

cluster = pk.Cluster.from_config(a.config, a.name)
client = pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=180)
x = np.load(a.images)
logits, seconds = [], []
for i in range(len(x)):
    t = time.perf_counter()
    logits.append(client.query(x[i:i + 1]))
    seconds.append(time.perf_counter() - t)
listen = listening()
client.close()
np.save(a.out, np.concatenate(logits))
with open(a.out + ".json", "w") as f:
    json.dump({"seconds": seconds, "listening": listen}, f)
print("CLIENT DONE median {:.1f} ms".format(1000 * float(np.median(seconds[1:]))), flush=True)
