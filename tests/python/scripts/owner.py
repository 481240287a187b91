"""Model-owner process for the end-to-end tests: start a cluster, share a model, serve."""
import argparse
import sys

import privatekeras as pk
from privatekeras.convert import load_model

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--model", required=True, help=".keras/.h5 path")
p.add_argument("--as-object", action="store_true", help="load the file, share the object")
p.add_argument("--batch-size", type=int, default=None)
p.add_argument("--num-requests", type=int, required=True)
p.add_argument("--protocol", default="aby3")
a = p.parse_args()

cluster = pk.Cluster(a.hosts.split(",")).start()
try:
    model = load_model(a.model) if a.as_object else a.model
    shared = pk.share(model, cluster, protocol=a.protocol, batch_size=a.batch_size)
    print("SHARED", repr(shared), flush=True)
    print("SECURE_RANDOMNESS", pk.secure_randomness_active(), flush=True)
    n = shared.serve(num_requests=a.num_requests)
    print("SERVED", n, flush=True)
finally:
    cluster.stop()
sys.exit(0)
