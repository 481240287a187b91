"""Model-owner process for the end-to-end tests: start a cluster, share a model, serve."""
import argparse
import sys

import privatekeras as pk

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--model", required=True, help=".keras/.h5 path")
p.add_argument("--as-object", action="store_true", help="load the file, share the object")
p.add_argument("--batch-size", type=int, default=None)
p.add_argument("--num-requests", type=int, required=True)
p.add_argument("--protocol", default="aby3")
p.add_argument("--external-workers", action="store_true",
               help="the workers already run (started by the test): do not start them")
a = p.parse_args()

cluster = pk.Cluster(a.hosts.split(","), auto_managed=not a.external_workers)
if not a.external_workers:
    cluster.start()
try:
    if a.as_object:
        from privatekeras.convert import load_model

        model = load_model(a.model)
    else:
        model = a.model
    shared = pk.share(model, cluster, protocol=a.protocol, batch_size=a.batch_size)
    print("SHARED", repr(shared), flush=True)
    n = shared.serve(num_requests=a.num_requests)
    print("SERVED", n, flush=True)
finally:
    cluster.stop()
sys.exit(0)
