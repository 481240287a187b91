"""Model owner on its own host: share a model on the workers of a hosts file and serve it.

Prints ``SHARED``, ``LISTENING <ip:port ...>`` (this host's listening sockets), ``SERVING``
(just before serve() blocks), then ``SERVED <n>`` or ``ERROR <exception class> <message>``
when serve() fails, ``STEPS <json>`` (the private step's run times reported by worker 0) and
``LISTENING-AFTER <ip:port ...>``. Exits 0 unless sharing fails.
"""
import argparse
import json
import sys

import privatekeras as pk

from netinfo import listening, listening6

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--name", required=True)
p.add_argument("--model", required=True)
p.add_argument("--num-requests", type=int, default=None, help="default: until stopped")
a = p.parse_args()

cluster = pk.Cluster.from_config(a.config, a.name)
shared = pk.share(a.model, cluster)
print("SHARED", repr(shared), flush=True)
print("LISTENING", " ".join(listening() + listening6()), flush=True)
print("SERVING", flush=True)
try:
    served = shared.serve(num_requests=a.num_requests)
except pk.PrivateKerasError as exc:
    print("ERROR", type(exc).__name__, exc, flush=True)
else:
    print("SERVED", served, flush=True)
print("STEPS", json.dumps(shared.step_seconds), flush=True)
print("LISTENING-AFTER", " ".join(listening() + listening6()), flush=True)
sys.exit(0)
