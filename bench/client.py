"""The Python client's process of one benchmark configuration.

Connects, then (when run.py says GO) sends the first COUNT images of IMAGES (.npy) as private
queries of BATCH images each (the last one padded by the client), timing each
``client.query()`` call. Between
the first query and the rest, and after the last, it pauses (``@@ SNAP``) so run.py can read
the workers' socket counters. Saves the logits and per-query seconds to OUT (.npz).

    python bench/client.py HOSTS BATCH COUNT IMAGES OUT
"""

import sys
import time

import numpy as np

import child

child.die_with_parent()
import privatekeras as pk  # noqa: E402


def main():
    hosts, batch, count = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    images, out = np.load(sys.argv[4])[:count], sys.argv[5]
    client = pk.connect(pk.Cluster(hosts, auto_managed=False), input_shape=(batch, 28, 28, 1),
                        output_shape=(batch, 10), timeout=300)
    try:
        child.say("CONNECTED")
        child.wait_for("GO")
        logits, seconds = [], []
        for i, start in enumerate(range(0, count, batch)):
            if i == 1:
                child.say("SNAP")
                child.wait_for("OK")
            x = images[start:start + batch]
            t = time.perf_counter()
            y = client.query(x)
            seconds.append(time.perf_counter() - t)
            logits.append(y)
        child.say("SNAP")
        child.wait_for("OK")
        np.savez(out, logits=np.concatenate(logits), seconds=np.array(seconds))
    finally:
        client.close()
    child.say("DONE")


if __name__ == "__main__":
    main()
