"""A client run in an environment without TensorFlow (numpy, grpcio and protobuf only):
query the served model, save the logits and probabilities, and report which top-level
modules this process ended up importing."""
import argparse
import json
import sys

import numpy as np

import privatekeras as pk

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--images", required=True)
p.add_argument("--start", type=int, default=0)
p.add_argument("--count", type=int, default=10)
p.add_argument("--out", required=True, help=".npz with logits and proba")
a = p.parse_args()

after_import = sorted({m.split(".")[0] for m in sys.modules})
client = pk.connect(pk.Cluster(a.hosts.split(","), auto_managed=False), (1, 28, 28, 1),
                    (1, 10), timeout=60)
x = np.load(a.images)[a.start:a.start + a.count]
logits = client.query(x)
proba = client.predict_proba(x[:2])
np.savez(a.out, logits=logits, proba=proba)
print(json.dumps({"after_import": after_import,
                  "after_queries": sorted({m.split(".")[0] for m in sys.modules}),
                  "executable": sys.executable, "prefix": sys.prefix}), flush=True)
