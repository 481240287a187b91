"""One worker's part of the traced private step: what runs in that worker's own process.

Every worker traces the whole step itself, from the model's public spec (all three parties'
ops, the crossings routed over the mesh by :mod:`privatekeras.mpc.routing`) and keeps only its
own ops. A routed step has no edge between workers' devices, so a worker's part is simply the
ops on its device plus the step arguments they read: it runs as a function of its own, in its
own process, on its own resources, when worker 0 says "go" (:mod:`privatekeras.deploy.mesh`).
No worker runs a graph another party built.

The three parts meet only in their mesh messages, matched by ``(step id, edge)``; so the three
traces must agree on every message. :func:`plan` is a digest of a traced step's messages
(edge, sending and receiving worker, dtype, shape) which the workers compare before serving.
"""

import hashlib

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from .routing import RECV, SEND


def _same_device(a, b):
    return bool(a) and tf.DeviceSpec.from_string(a) == tf.DeviceSpec.from_string(b)


def part(graph, device, feeds, fetch):
    """Worker ``device``'s part of ``graph`` (a traced, routed step) as a function of the
    placeholders named ``feeds`` (a list of op names) returning tensor ``fetch`` (a name);
    every PkMeshSend on the device runs too. Raises ValueError when an op of the device reads
    an op of another device (the step was not routed)."""
    graph_def = graph.as_graph_def()
    mine = {n.name for n in graph_def.node
            if _same_device(n.device, device) or n.name in feeds}
    keep = graph_pb2.GraphDef(versions=graph_def.versions, library=graph_def.library)
    sends = []
    for n in graph_def.node:
        if n.name not in mine:
            continue
        for name in n.input:
            source = name.lstrip("^").split(":")[0]
            if source not in mine:
                raise ValueError("{} ({}) reads {} on another worker: route the step over "
                                 "the mesh first".format(n.name, n.op, source))
        keep.node.add().CopyFrom(n)
        if n.op == SEND:
            sends.append(n.name)

    def load():
        tf.graph_util.import_graph_def(keep, name="")

    wrapped = tf.compat.v1.wrap_function(load, [])
    g = wrapped.graph
    return wrapped.prune(feeds=[g.get_tensor_by_name(f + ":0") for f in feeds],
                         fetches=[g.get_tensor_by_name(fetch)] +
                         [g.get_operation_by_name(s) for s in sends])


def plan(graph):
    """A digest (hex) of the messages of a routed step: for each edge, its sending and
    receiving devices, dtype and shape. Two traces agree on their messages iff their plans
    are equal."""
    rows = []
    for op in graph.get_operations():
        if op.type == SEND:
            x = op.inputs[1]
            rows.append((op.get_attr("edge"), "send", tf.DeviceSpec.from_string(op.device).task,
                         op.get_attr("peer"), x.dtype.name, str(x.shape)))
        elif op.type == RECV:
            rows.append((op.get_attr("edge"), "recv", tf.DeviceSpec.from_string(op.device).task,
                         op.get_attr("peer"), op.get_attr("T").name, str(op.outputs[0].shape)))
    return hashlib.sha256(repr(sorted(rows)).encode()).hexdigest()
