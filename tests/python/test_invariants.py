"""Security invariants of the traced private step, read off the graph the workers run."""

import collections
import subprocess
import sys

import pytest

from conftest import child_env, free_hosts

INSPECT = r"""
import collections, json, sys
import keras
import tensorflow as tf
import privatekeras as pk
L = keras.layers
model = keras.Sequential([keras.Input((12, 12, 1), batch_size=2), L.Conv2D(4, 3, strides=2),
                          L.ReLU(), L.MaxPooling2D(2, strides=1), L.AveragePooling2D(2),
                          L.Flatten(), L.Dense(3)])
cluster = pk.Cluster(sys.argv[1].split(",")).start()
report = {}
for protocol in ("aby3", "securenn"):
    shared = pk.share(model, cluster, protocol=protocol)
    ops = shared.traced.graph.get_operations()
    # The step's arguments are the client's queue handles (DT_RESOURCE placeholders): names
    # of queues on the workers, not values. Everything else unplaced runs in the owner.
    handles = [op for op in ops if op.type == "Placeholder"
               and op.get_attr("dtype") == tf.resource]
    report.setdefault("handle_args", {})[protocol] = len(handles)
    unplaced = [op for op in ops if not op.device and op not in handles]
    report[protocol] = {
        "types": collections.Counter(op.type for op in ops),
        "devices": collections.Counter(op.device for op in ops),
        "workers": cluster.devices,
        "unplaced_types": collections.Counter(op.type for op in unplaced),
        # ops off the workers that read anything computed on a worker
        "unplaced_reading_workers": [op.name for op in unplaced
                                     if any(i.op.device for i in op.inputs)],
    }
cluster.stop()
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    import json

    out = subprocess.run([sys.executable, "-c", INSPECT, ",".join(free_hosts())],
                         env=child_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(lines[0][len("REPORT "):])


@pytest.mark.parametrize("protocol", ["aby3", "securenn"])
def test_nothing_of_a_query_flows_back_to_the_model_owner(report, protocol):
    """Every op of the traced step that touches shares is pinned to a worker. Ops left
    unplaced (they run in the model owner's process) may only read constants and fresh
    randomness: no value computed on a worker ever reaches the owner."""
    r = report[protocol]
    assert set(r["devices"]) - {""} <= set(r["workers"]), r["devices"]
    assert r["unplaced_reading_workers"] == []
    assert set(r["unplaced_types"]) <= {"Const", "PkSecureSeed", "PkSeededRandomUniform",
                                        "Sub", "FloorMod"}, r["unplaced_types"]


def test_aby3_runs_everything_on_the_workers(report):
    """Apart from the 6 queue-handle arguments (each worker's input and output queue of
    the querying client), every op of the ABY3 step is placed on a worker."""
    assert report["handle_args"]["aby3"] == 6
    assert report["aby3"]["unplaced_types"] == {}


@pytest.mark.parametrize("protocol", ["aby3", "securenn"])
def test_randomness_comes_only_from_our_csprng(report, protocol):
    types = collections.Counter(report[protocol]["types"])
    assert types["PkSecureSeed"] > 0  # fresh seeds drawn on every execution
    insecure = [t for t in types if ("Random" in t or "Seed" in t) and not t.startswith("Pk")]
    assert not insecure, insecure


def test_aby3_rekeys_its_prfs_in_every_query(report):
    """ABY3's pairwise PRF keys are drawn inside the traced step (3 seeds for pairwise
    randomness), not once at start-up, so masks are never reused across queries."""
    assert report["aby3"]["types"]["PkSecureSeed"] >= 3
