"""A client with one query, instrumented (here, not in the library) to let a test watch it:
its Fetch calls are held back until the file --go exists, and the first prints
``QID <query id>``; then it saves its logits.
"""
import argparse
import asyncio
import os
import time

import numpy as np

import privatekeras as pk

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--images", required=True)
p.add_argument("--index", type=int, required=True)
p.add_argument("--go", required=True, help="fetch once this file exists")
p.add_argument("--out", required=True)
a = p.parse_args()

client = pk.connect(pk.Cluster(a.hosts.split(","), auto_managed=False), (1, 28, 28, 1),
                    (1, 10), timeout=60)


class HeldFetch:
    """The client's Fetch calls to one worker (asyncio), held back until --go exists; the
    first one prints the query id (by then the Submit calls are on their way)."""

    def __init__(self, method):
        self.method = method

    def __call__(self, request, *args, **kwargs):
        async def held_call():
            if not held:
                held.append(request.query_id)
                print("QID", request.query_id, flush=True)
            deadline = time.monotonic() + 120
            while not os.path.exists(a.go):
                assert time.monotonic() < deadline, "no go"
                await asyncio.sleep(0.05)
            return await self.method(request, *args, **kwargs)

        return asyncio.ensure_future(held_call())  # a task: cancel() works as on a call


held = []
for stub in client._link.stubs:
    stub.Fetch = HeldFetch(stub.Fetch)
x = np.load(a.images)[a.index:a.index + 1]
np.save(a.out, client.query(x))
print("VICTIM DONE", flush=True)
