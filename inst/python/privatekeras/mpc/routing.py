"""Routing the private step's protocol messages over the workers' mesh.

A worker traces the step as one graph whose ops sit on the three workers' devices. Every
tensor that one worker's op hands to another worker's op becomes a :class:`PkMeshSend` on the
producer's device and a ``PkMeshRecv`` on the consumer's, which push the tensor over the
workers' own links (:mod:`privatekeras.deploy.mesh`) as soon as it exists: one write on one
side, one wake-up on the other. After routing, no edge joins two workers' devices, so each
worker can run its own part of the graph alone (:mod:`privatekeras.mpc.partition`).

Each routed edge has a number (``edge``), and every execution of the step a fresh step id
(a function argument), so a message is matched to exactly one receive. What is not routed:

* the step's arguments (step id, each worker's input rows): each worker's part is fed its
  own;
* control edges between workers (ordering only, no data; the traced step has none);
* edges from or to ops without a device (the traced step has none but its arguments).
"""

import tensorflow as tf

SEND, RECV = "PkMeshSend", "PkMeshRecv"


def _party(op, tasks):
    """The worker index of ``op``'s device, or None (no device, or not a worker's)."""
    if not op.device:
        return None
    spec = tf.DeviceSpec.from_string(op.device)
    return tasks.get((spec.job, spec.task))


def route(graph, devices, step_id):
    """Route every tensor that crosses between workers in ``graph`` (a step being traced)
    through a PkMeshSend/PkMeshRecv pair; ``step_id`` is the step's id argument (a scalar
    int64 placeholder, fed to each worker's part). Each (tensor, receiving worker)
    gets one pair, shared by all its consumers there. Returns the number of routed edges."""
    from ..kernels import mesh

    tasks = {}
    for i, device in enumerate(devices):
        spec = tf.DeviceSpec.from_string(device)
        tasks[(spec.job, spec.task)] = i
    received = {}  # (tensor name, receiving worker) -> its PkMeshRecv output
    for op in list(graph.get_operations()):
        here = _party(op, tasks)
        if here is None or op.type in (SEND, RECV):
            continue
        for k, t in enumerate(op.inputs):
            there = _party(t.op, tasks)
            if there is None or there == here or t.op.type == "Placeholder":
                continue
            key = (t.name, here)
            if key not in received:
                edge = len(received)
                with tf.device(devices[there]):
                    mesh.send(step_id, t, peer=here, edge=edge)
                with tf.device(devices[here]):
                    received[key] = mesh.recv(step_id, t.dtype, t.shape, peer=there,
                                              edge=edge)
            op._update_input(k, received[key])  # TensorFlow's (private) in-place rewiring
    return len(received)
