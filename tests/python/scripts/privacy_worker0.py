"""Worker 0 run by test code, so the test can read the private step it traced.

The test starts this script as worker 0 of a cluster whose workers 1 and 2 are real
``python -m privatekeras worker`` processes. It builds ``privatekeras.worker.WorkerServer``
from a ``WorkerConfig`` itself (what ``privatekeras worker --index 0`` does), under the loopback
interposer (the test starts it with ``deploy.confine.interposer_env`` and
``PRIVATEKERAS_CONFINE_PORTS`` = the compute and mesh ports, comma-separated), checks those
ports are confined as the worker entry point does, and serves. Once the owner's Prepare has
traced the step, it writes a JSON report of the traced step (``server._steps[1].concrete``):
every node of the step's graph and of the functions it calls (while-loop bodies), with op
type, device, inputs and, for the mesh ops (PkMeshSend, PkMeshRecv), their ``peer`` and
``edge``; the step's arguments and captured inputs; its graph stats (``step.stats()``); the
workers' devices; whether TF Encrypted draws randomness from our kernels.

Usage: privacy_worker0.py --hosts h0,h1,h2 --compute c0,c1,c2 [--mesh m0,m1,m2] --report R.json
Runs until terminated; prints ``READY`` and then ``REPORT <path>``.
"""
import argparse
import json
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--compute", required=True)
p.add_argument("--mesh", default=None)  # default: each compute port + 1, as for the worker
p.add_argument("--report", required=True)
a = p.parse_args()

from privatekeras.cluster import local_worker_names  # noqa: E402
from privatekeras.deploy.confine import interposer_active  # noqa: E402
from privatekeras.deploy.listening import check_confined  # noqa: E402
from privatekeras.deploy.pki import load_local  # noqa: E402
from privatekeras.worker import WorkerConfig, WorkerServer  # noqa: E402

if not interposer_active():
    raise SystemExit("privacy_worker0.py must run with the loopback interposer preloaded")
hosts, compute = a.hosts.split(","), a.compute.split(",")
mesh = a.mesh.split(",") if a.mesh else None
names = local_worker_names()
config = WorkerConfig(0, names, hosts, compute, load_local(hosts, names[0]), mesh=mesh)
server = WorkerServer(config).start()
check_confined(config.confined_ports)
print("READY 0 {}".format(hosts[0]), flush=True)

while not server._steps:
    time.sleep(0.05)

import privatekeras as pk  # noqa: E402


MESH_OPS = ("PkMeshSend", "PkMeshRecv")


def node(n):
    out = {"name": n.name, "op": n.op, "device": n.device, "inputs": list(n.input)}
    if n.op in MESH_OPS:
        out.update(peer=n.attr["peer"].i, edge=n.attr["edge"].i)
    return out


def nodes(node_defs):
    return [node(n) for n in node_defs]


step = server._steps[1]
concrete = step.concrete
graph_def = concrete.graph.as_graph_def()
report = {
    "devices": config.devices,
    "confined_ports": config.confined_ports,
    "arguments": [[t.name, t.dtype.name] for t in concrete.inputs],
    "captured": len(concrete.captured_inputs),
    "stats": step.stats(),
    "nodes": nodes(graph_def.node),
    "functions": {f.signature.name: nodes(f.node_def) for f in graph_def.library.function},
    "secure_randomness_active": pk.secure_randomness_active(),
    "pid": os.getpid(),
}
with open(a.report + ".tmp", "w") as f:
    json.dump(report, f)
os.replace(a.report + ".tmp", a.report)
print("REPORT {}".format(a.report), flush=True)
server.wait()
