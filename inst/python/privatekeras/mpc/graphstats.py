"""What one traced private step costs, read from its TensorFlow graph: ops and rounds.

The step is one ``tf.function`` whose ops are placed on the three workers' devices; when it
runs, TensorFlow partitions the graph per device and puts a Send/Recv pair on every edge that
crosses from one device to another. So, from the graph alone:

- **ops**: the graph's operations (what worker 0 traced, all three workers together), and
  how many each party runs; ``mesh_ops`` says how many of them are the mesh's sends and
  receives;
- **messages**: the tensors (and control edges) that cross between parties, counted once per
  (producing tensor, receiving party): one Send/Recv pair each at run time;
- **rounds**: the longest chain of dependent crossings: the depth of the dependency DAG when
  an edge costs 1 if it crosses between parties and 0 otherwise. A protocol round whose
  messages all go out together counts once; rounds that wait on each other add up;
- **bytes**: the payload of the messages (static shapes x dtype size).

A step routed over the workers' mesh (:mod:`privatekeras.mpc.routing`) has a PkMeshSend /
PkMeshRecv pair (same ``edge``) instead of a crossing edge: the pair counts as one message and
the receive as one hop after its send.

Ops without a device are placed at run time on the calling process' device: worker 0's.
Nothing here runs the graph; it works on any graph (the tests use three logical CPUs of one
process as the three parties).
"""

import collections

# privatekeras.mpc.routing's ops, named here too: this module imports nothing of the package
# (bench/prev_owner.py loads it by path into the previous release's process)
MESH_SEND, MESH_RECV = "PkMeshSend", "PkMeshRecv"


def _party_key(device, default):
    import tensorflow as tf

    spec = tf.DeviceSpec.from_string(device or default or "")
    return (spec.job or "", spec.replica or 0, spec.task or 0,
            (spec.device_type or "CPU").upper(), spec.device_index or 0)


def step_stats(graph, default_device=None):
    """Ops, messages, rounds and bytes of one traced step (``graph``: a ``tf.Graph``, e.g.
    ``concrete_function.graph``); ``default_device`` is where unplaced ops run (worker 0's
    device). Returns a dict of plain ints (and ``ops_by_type``, the ten commonest)."""
    ops = graph.get_operations()
    keys = {}
    parties = {}
    for op in ops:
        key = _party_key(op.device, default_device)
        keys[op.name] = parties.setdefault(key, len(parties))
    sends = {op.get_attr("edge"): op for op in ops if op.type == MESH_SEND}
    depth = {}
    messages = set()
    payload = 0
    for op in _topological(ops, sends):
        here = keys[op.name]
        d = 0
        for t in op.inputs:
            src = t.op
            there = keys[src.name]
            cross = there != here
            if cross and (t.name, here) not in messages:
                messages.add((t.name, here))
                payload += _nbytes(t)
            d = max(d, depth.get(src.name, 0) + cross)
        for src in op.control_inputs:
            there = keys[src.name]
            cross = there != here
            if cross:
                messages.add((src.name + "^", here))
            d = max(d, depth.get(src.name, 0) + cross)
        if op.type == MESH_RECV:  # a message over the mesh, from its PkMeshSend
            send = sends[op.get_attr("edge")]
            messages.add((send.name, here))
            payload += _nbytes(send.inputs[1])
            d = max(d, depth[send.name] + 1)
        depth[op.name] = d
    per_party = collections.Counter(keys[op.name] for op in ops)
    return {
        "ops": len(ops),
        # of which the mesh's sends and receives: the explicit form of the Send/Recv pairs
        # TensorFlow inserts at run time for crossing edges (which the graph never shows)
        "mesh_ops": sum(op.type in (MESH_SEND, MESH_RECV) for op in ops),
        "ops_per_party": [per_party[i] for i in range(len(parties))],
        "parties": len(parties),
        "rounds": max(depth.values(), default=0),
        "messages": len(messages),
        "message_bytes": int(payload),
        "ops_by_type": dict(collections.Counter(op.type for op in ops).most_common(10)),
    }


def _topological(ops, sends):
    """``ops`` ordered so that every op comes after its inputs, its control inputs and (a
    PkMeshRecv) its PkMeshSend. Creation order is such an order until the mesh routing
    (:mod:`privatekeras.mpc.routing`) hands existing ops inputs made after them."""
    by_name = {op.name: op for op in ops}
    done, order = set(), []
    for root in ops:
        stack = [(root, False)]
        while stack:
            op, expanded = stack.pop()
            if op.name in done:
                continue
            if expanded:
                done.add(op.name)
                order.append(op)
                continue
            stack.append((op, True))
            before = [t.op for t in op.inputs] + list(op.control_inputs)
            if op.type == MESH_RECV:
                before.append(sends[op.get_attr("edge")])
            stack.extend((by_name[b.name], False) for b in before if b.name not in done)
    return order


def _nbytes(t):
    try:
        n = 1
        for d in t.shape.as_list():
            if d is None:
                return 0
            n *= d
        return n * t.dtype.size
    except (ValueError, TypeError):  # unknown rank, or a resource / variant / string
        return 0
