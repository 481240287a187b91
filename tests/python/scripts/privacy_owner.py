"""Model owner for the privacy and invariant tests: share a model onto running workers and
serve a number of queries, recording (test instrumentation, in this process only) every API
message exchanged with each worker (privacy_record.py) and, per weight, its fixed-point
encoding and the three ABY3 shares it was split into.

Usage: privacy_owner.py --hosts h0,h1,h2 --model M.keras --num-requests N --out OUT.pkl
Prints ``RECORD SHARED <t>`` once the model is shared and ``SERVED <n>`` at the end.
"""
import argparse

import privacy_record as rec

import privatekeras as pk
import privatekeras.owner as owner_module

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True, help="the workers' API addresses as we reach them")
p.add_argument("--model", required=True)
p.add_argument("--num-requests", type=int, required=True)
p.add_argument("--out", required=True)
a = p.parse_args()

rec.record_api()
weights = []  # per weight: {"encoded": v, "shares": (s0, s1, s2)}
share_ring = owner_module.share_ring


def recording_share(v):
    per_worker = share_ring(v)
    weights.append({"encoded": v.copy(), "shares": tuple(pair[0].copy() for pair in per_worker)})
    return per_worker


owner_module.share_ring = recording_share
cluster = pk.Cluster(a.hosts.split(","), auto_managed=False)
shared = pk.share(a.model, cluster)
t_shared = rec.now()
print("RECORD SHARED {:.6f}".format(t_shared), flush=True)
n = shared.serve(num_requests=a.num_requests)
t_served = rec.now()
rec.save(a.out, weights=weights, t_shared=t_shared, t_served=t_served, served=n)
print("SERVED", n, flush=True)
