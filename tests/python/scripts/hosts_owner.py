"""Model owner on a separate host: share a model on the workers of a hosts file and serve."""
import argparse
import sys

import privatekeras as pk
from privatekeras.loopback import loopback_active

from netinfo import listening


p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--name", required=True)
p.add_argument("--model", required=True)
p.add_argument("--num-requests", type=int, required=True)
a = p.parse_args()

print("LOOPBACK_ACTIVE", loopback_active(), flush=True)
cluster = pk.Cluster.from_config(a.config, a.name)
try:
    shared = pk.share(a.model, cluster)
    print("SHARED", repr(shared), flush=True)
    print("LISTENING", " ".join(listening()), flush=True)
    print("SERVED", shared.serve(num_requests=a.num_requests), flush=True)
finally:
    cluster.stop()
sys.exit(0)
