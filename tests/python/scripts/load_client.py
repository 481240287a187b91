"""Client process for load and fault tests: query images one at a time, record everything.

Writes a .npz with the indices queried, their logits (NaN where a query failed), latency per
query, and the error (type: message) of the first failure, if any. A failure is printed as
``QUERY FAILED at <unix time> after <s> s in <phase>: <type>: <message>``, where phase is
``submit`` (the workers had not all accepted the shares yet) or ``fetch`` (all three held
them: the client was waiting for its answer).

--die makes the client misbehave once and exit at once with code 3 (test instrumentation,
through the client's own internals; nothing in the library is changed):
  submit-0   submit its shares to worker 0 only;
  submit-12  submit its shares to workers 1 and 2 only;
  no-fetch   submit to all three, never fetch;
  fetch-0    submit to all three, fetch worker 0's answer shares only.
"""
import argparse
import os
import time

import numpy as np

import privatekeras as pk
from privatekeras import client as client_module
from privatekeras import wire

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--images", required=True, help=".npy file of inputs")
p.add_argument("--start", type=int, default=0)
p.add_argument("--count", type=int, required=True)
p.add_argument("--out", required=True)
p.add_argument("--timeout", type=float, default=120)
p.add_argument("--keep-going", action="store_true", help="continue after a failed query")
p.add_argument("--die", choices=["submit-0", "submit-12", "no-fetch", "fetch-0"], default=None)
a = p.parse_args()

x = np.load(a.images)
cluster = pk.Cluster(a.hosts.split(","), auto_managed=False)
# Which phase a query is in: "fetch" once every worker accepted its shares (the Submit calls
# of the client's asyncio link are watched through a thin wrapper, here, not in the library).
submitted = []


class WatchedSubmit:
    def __init__(self, method):
        self.method = method

    def __call__(self, *args, **kwargs):
        import asyncio

        task = asyncio.ensure_future(self.method(*args, **kwargs))
        submitted.append(task)
        return task


link_init = client_module._Link.__init__


def watched_init(self, cluster):
    link_init(self, cluster)
    for stub in self.stubs:
        stub.Submit = WatchedSubmit(stub.Submit)


client_module._Link.__init__ = watched_init
client = pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=a.timeout)
print("CONNECTED", flush=True)


def die(how):
    spec = client._spec = client._served_spec()
    shares = client_module.share_values(x[a.start:a.start + 1].astype(np.float64))
    query_id = os.urandom(16).hex()
    secrets = [os.urandom(32) for _ in range(3)]
    to = {"submit-0": [0], "submit-12": [1, 2]}.get(how, [0, 1, 2])
    stubs = cluster.stubs("client")  # blocking calls: this client dies right after
    for i in to:
        stubs[i].Submit(wire.M.SubmitRequest(
            query_id=query_id, model_id=spec["model_id"], session=spec["session"],
            shares=[wire.tensor(s) for s in shares[i]], fetch_digest=wire.digest(secrets[i])),
            timeout=a.timeout)
    if how == "fetch-0":
        deadline = time.monotonic() + a.timeout
        while not stubs[0].Fetch(wire.M.FetchRequest(
                query_id=query_id, fetch_secret=secrets[0], wait_seconds=5),
                timeout=20).ready:
            assert time.monotonic() < deadline, "no answer from worker 0"
    print("DYING", how, flush=True)
    os._exit(3)


if a.die:
    die(a.die)

def phase():
    calls = submitted[-3:]
    done = len(calls) == 3 and all(c.done() and not c.cancelled() and c.exception() is None
                                   for c in calls)
    return "fetch" if done else "submit"


idx = np.arange(a.start, a.start + a.count)
logits = np.full((a.count, 10), np.nan, dtype=np.float32)
latency = np.full(a.count, np.nan)
error = ""
for k, i in enumerate(idx):
    del submitted[:]
    t0 = time.perf_counter()
    try:
        logits[k] = client.query(x[i:i + 1])[0]
    except pk.PrivateKerasError as exc:
        latency[k] = time.perf_counter() - t0
        error = error or "{}: {}".format(type(exc).__name__, exc)
        print("QUERY FAILED at {:.3f} after {:.2f} s in {}: {}: {}".format(
            time.time(), latency[k], phase(), type(exc).__name__, exc), flush=True)
        if not a.keep_going:
            break
        continue
    latency[k] = time.perf_counter() - t0
np.savez(a.out, idx=idx, logits=logits, latency=latency, error=np.array(error))
print("CLIENT DONE", flush=True)
