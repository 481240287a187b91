"""The client process of the CKKS bench (bench/ckks.py): connect, make keys, query, time.

Prints one JSON line: key generation time, the first query after it, batch-1 and all-rows
latencies (wall time of ``query()``: encrypt, send, evaluate, return, decrypt), bytes sent
and received, and the decrypted linear predictor's error vs plaintext.
"""

import argparse
import json
import sys
import time

import numpy as np

import privatekeras as pk
from privatekeras.ckks.engine import make_context


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--x", required=True)
    p.add_argument("--eta", required=True)
    p.add_argument("--queries", type=int, default=40)
    a = p.parse_args()
    x, plain = np.load(a.x), np.load(a.eta)
    client = pk.connect(pk.Server(a.host, auto_managed=False), timeout=120)
    spec = client.describe()  # makes the keys (timed below again, alone)
    keygen = []
    for _ in range(5):
        t0 = time.perf_counter()
        make_context(spec["ckks"], secret=True)
        keygen.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    client.query(x[:1])  # the server checks this client's new context once
    warmup = time.perf_counter() - t0

    def timed(rows, n):
        seconds, sent, received = [], [], []
        for i in range(n):
            s0, r0 = client.bytes_sent, client.bytes_received
            t = time.perf_counter()
            out = client.query(rows(i))
            seconds.append(time.perf_counter() - t)
            sent.append(client.bytes_sent - s0)
            received.append(client.bytes_received - r0)
        return np.array(seconds) * 1e3, np.median(sent), np.median(received), out

    one, one_sent, one_recv, _ = timed(lambda i: x[i % len(x):i % len(x) + 1], a.queries)
    every, all_sent, all_recv, eta = timed(lambda i: x, max(5, a.queries // 4))
    k = plain.shape[1]
    agree = ((eta > 0) == (plain > 0)).mean() if k == 1 else \
        (eta.argmax(1) == plain.argmax(1)).mean()
    print(json.dumps({
        "rows": int(x.shape[0]), "features": int(x.shape[1]), "outputs": int(k),
        "keygen_ms": float(np.median(keygen) * 1e3), "warmup_ms": warmup * 1e3,
        "context_bytes": len(client._keys[2]),
        "one_median_ms": float(np.median(one)), "one_p90_ms": float(np.percentile(one, 90)),
        "all_median_ms": float(np.median(every)), "all_p90_ms": float(np.percentile(every, 90)),
        "one_bytes_per_row": float(one_sent), "all_bytes_per_row": float(all_sent / len(x)),
        "one_bytes_received": float(one_recv), "all_bytes_received": float(all_recv),
        "max_abs_error": float(np.abs(eta - plain).max()),
        "class_agreement": float(agree)}), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
