"""Client for the privacy and invariant tests: send the same image several times, recording
(test instrumentation, in this process only) every API message exchanged with each worker
(privacy_record.py) and, per query, the encoded input and the ABY3 shares it was split into.

From query ``--same-shares-from`` on, every query is sent with one and the same share set
(drawn once, then reused byte for byte): what reaches the workers is then identical, so any
difference in what they exchange or answer comes from their own fresh randomness.

Usage: privacy_client.py --hosts h0,h1,h2 --image X.npy --queries N --out OUT.pkl
"""
import argparse
import time

import numpy as np
import privacy_record as rec

import privatekeras as pk
import privatekeras.client as client_module
from privatekeras.mpc import encoding

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True, help="the workers' API addresses as we reach them")
p.add_argument("--image", required=True, help=".npy file: one query (batch first)")
p.add_argument("--queries", type=int, default=3)
p.add_argument("--classes", type=int, default=10, help="logits per row of the answer")
p.add_argument("--same-shares-from", type=int, default=None, metavar="K")
p.add_argument("--pause", type=float, default=0.5, help="seconds between queries")
p.add_argument("--timeout", type=float, default=240)
p.add_argument("--out", required=True)
a = p.parse_args()

rec.record_api()
sharings = []  # per query: the encoded input and (s0, s1, s2)
state = {"query": 0, "fixed": None}
share_values = client_module.share_values


def recording_share_values(x, *args, **kwargs):
    q = state["query"]
    if a.same_shares_from is not None and q >= a.same_shares_from:
        if state["fixed"] is None:
            state["fixed"] = share_values(x, *args, **kwargs)
        per_worker = state["fixed"]
    else:
        per_worker = share_values(x, *args, **kwargs)
    sharings.append({"query": q, "encoded": encoding.FIXED64.encode(x),
                     "shares": tuple(pair[0].copy() for pair in per_worker)})
    return per_worker


client_module.share_values = recording_share_values
image = np.load(a.image)
cluster = pk.Cluster(a.hosts.split(","), auto_managed=False)
client = pk.connect(cluster, image.shape, (image.shape[0], a.classes), timeout=a.timeout)
queries = []
for q in range(a.queries):
    state["query"] = q
    t_start = rec.now()
    logits = client.query(image)
    queries.append({"t_start": t_start, "t_end": rec.now(), "logits": logits})
    print("RECORD QUERY {} {:.6f} {:.6f}".format(q, t_start, queries[-1]["t_end"]), flush=True)
    time.sleep(a.pause)
rec.save(a.out, sharings=sharings, queries=queries)
print("DONE", flush=True)
