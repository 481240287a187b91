"""A legitimate client of the cluster (the cluster's client certificate) that knows another
client's query id and tries to get that query's shares or answer from every worker, or to
take its id over. Prints one JSON object: per worker and attempt, the outcome
("OK ..." or "<error type>: <message>").
"""
import argparse
import json
import os

import numpy as np

import privatekeras as pk
from privatekeras import wire

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--qid", required=True)
a = p.parse_args()

cluster = pk.Cluster(a.hosts.split(","), auto_managed=False)
stubs = cluster.stubs("client")
board = cluster.status("client")[0]
spec = json.loads(board.spec_json)
zeros = np.zeros(spec["input_shape"], dtype=np.int64)


def attempt(call, name):
    try:
        reply = call()
    except Exception as exc:  # noqa: BLE001 - reported
        exc = wire.translate(exc, name)
        return "{}: {}".format(type(exc).__name__, exc)
    if hasattr(reply, "ready"):
        return "OK ready={} shares={}".format(reply.ready, len(reply.shares))
    return "OK"


def guesses():
    """Secrets an attacker might try: random, empty, all zeros, the id itself, too long."""
    return {"random": os.urandom(32), "empty": b"", "zeros": bytes(32),
            "the id": bytes.fromhex(a.qid), "long": os.urandom(64)}


out = {}
for i, (stub, name) in enumerate(zip(stubs, cluster.worker_names)):
    res = {}
    for what, secret in guesses().items():
        res["fetch " + what] = attempt(lambda: stub.Fetch(wire.M.FetchRequest(
            query_id=a.qid, fetch_secret=secret, wait_seconds=1), timeout=20), name)
    own_secret = os.urandom(32)
    res["submit same id"] = attempt(lambda: stub.Submit(wire.M.SubmitRequest(
        query_id=a.qid, model_id=spec["model_id"], session=board.session,
        shares=[wire.tensor(zeros), wire.tensor(zeros)], fetch_digest=wire.digest(own_secret)),
        timeout=20), name)
    # Having tried to take the id over, fetch with the secret of that attempt.
    res["fetch own secret"] = attempt(lambda: stub.Fetch(wire.M.FetchRequest(
        query_id=a.qid, fetch_secret=own_secret, wait_seconds=1), timeout=20), name)
    out[name] = res
print(json.dumps(out), flush=True)
