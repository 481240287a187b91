"""Client process for load and fault tests: query images one at a time, record everything.

Writes a .npz with the indices queried, their logits (NaN where a query failed), latency per
query, and the error (type: message) of the first failure, if any.
"""
import argparse
import os
import time

import numpy as np

import privatekeras as pk

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--images", required=True, help=".npy file of inputs")
p.add_argument("--start", type=int, default=0)
p.add_argument("--count", type=int, required=True)
p.add_argument("--out", required=True)
p.add_argument("--timeout", type=float, default=120)
p.add_argument("--keep-going", action="store_true", help="continue after a failed query")
p.add_argument("--die", choices=["after-ticket", "mid-put"], default=None,
               help="send one query's shares (all, or worker 0's only) and its ticket, then "
                    "die at once")
a = p.parse_args()

x = np.load(a.images)
cluster = pk.Cluster(a.hosts.split(","), auto_managed=False)
client = pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=a.timeout)
print("CONNECTED", flush=True)

if a.die:
    import tensorflow as tf

    from privatekeras import queues

    client.query(x[a.start:a.start + 1])  # attach to the served model first
    shares = client._layout.split(x[a.start:a.start + 1].astype(np.float64))
    if a.die == "mid-put":  # worst case: its ticket arrived, its shares only on worker 0
        slot = client._mailbox.inputs[0]
        queues.enqueue(slot.device, slot.handle, [tf.constant(s) for s in shares[0]])
    else:
        client._mailbox.put_inputs(shares)
    queues.enqueue(client.devices[0], client._tickets, [tf.constant(client.client_id)])
    queues.size(client.devices[0], client._tickets)  # a round trip: what we sent has landed
    print("DYING", flush=True)
    os._exit(3)

idx = np.arange(a.start, a.start + a.count)
logits = np.full((a.count, 10), np.nan, dtype=np.float32)
latency = np.full(a.count, np.nan)
error = ""
for k, i in enumerate(idx):
    t0 = time.perf_counter()
    try:
        logits[k] = client.query(x[i:i + 1])[0]
    except pk.PrivateKerasError as exc:
        latency[k] = time.perf_counter() - t0
        error = error or "{}: {}".format(type(exc).__name__, exc)
        print("QUERY FAILED at {:.3f} after {:.2f} s: {}".format(time.time(), latency[k], error),
              flush=True)
        if not a.keep_going:
            break
        continue
    latency[k] = time.perf_counter() - t0
np.savez(a.out, idx=idx, logits=logits, latency=latency, error=np.array(error))
print("CLIENT DONE", flush=True)
