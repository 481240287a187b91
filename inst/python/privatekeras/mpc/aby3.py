"""The private step: TF Encrypted's ABY3 over the three workers.

Every worker traces the same step from the model's public spec, one per group size: the step
takes each worker's input shares of the group's queries, evaluates the model on them with ABY3
(the weights read from each worker's own variables) and gives each worker its answer shares.
Values cross between workers only as ABY3's protocol messages, routed over the workers' own
links (:mod:`privatekeras.mpc.routing`, :mod:`privatekeras.deploy.mesh`), each execution
under a fresh step id. Each worker then keeps and runs only its own part of the step
(:mod:`privatekeras.mpc.partition`), in its own process, when worker 0 says "go": no worker
runs a graph built by another, and none sees another worker's shares.

The pairwise PRF keys are set up inside the step (``prot.reset()``), so every execution draws
fresh masks from the CSPRNG kernels: keys made once at construction would be constants of the
traced graph and every query would reuse the same masks.
"""

import collections
import contextlib
import json
import os
import threading
import time

import numpy as np
import tensorflow as tf

from . import graphstats, partition, routing, store
from .. import layers
from ..layers import INPUT
from .encoding import FIXED64
from .tfe_compat import import_tfe, untruncated_products

PROTOCOL = "aby3"
# When set (a file path), worker 0 appends one JSON line per traced step: its ops, rounds and
# messages (privatekeras.mpc.graphstats). ``make bench`` sets it; nothing else reads it.
STATS_ENV = "PRIVATEKERAS_STEP_STATS"


class ABY3Engine:
    """ABY3 on the workers' TensorFlow devices (``devices[i]`` is worker i's)."""

    encoding = FIXED64

    def __init__(self, devices, compute_addresses, job):
        tfe = import_tfe()
        # debug_mode disables TFE's global memoisation of protocol nodes, which would hand
        # tensors of an earlier trace to a later one.
        hostmap = collections.OrderedDict(
            ("server{}".format(i), h) for i, h in enumerate(compute_addresses))
        tfe.set_config(tfe.RemoteConfig(hostmap, job_name=job, debug_mode=True))
        # ABY3's constructor sets up pairwise keys on the three devices; in a graph of its own
        # nothing runs (this process may not reach the other workers' devices, and the step
        # sets up keys afresh anyway)
        with tf.Graph().as_default():
            self.prot = tfe.protocol.ABY3("server0", "server1", "server2")
            tfe.set_protocol(self.prot)
        self.devices = list(devices)
        self.mesh = True  # messages between workers over their mesh links
        self._step_ids = StepIds()
        self._check_encoding()

    def _check_encoding(self):
        fp = self.prot.fixedpoint_config
        assert (fp.scaling_base, fp.precision_fractional, fp.precision_integral) == (
            2, self.encoding.frac_bits, self.encoding.int_bits), "fixed-point mismatch"

    @classmethod
    def in_process(cls, devices):
        """The same engine with the three parties on three devices of this process (e.g.
        logical CPUs): for tests and for counting a step's ops and rounds without a cluster.
        Never used to serve."""
        tfe = import_tfe()
        from tf_encrypted.config import LocalConfig
        from tf_encrypted.player import Player

        class _Config(LocalConfig):
            def add_player(self, name):
                player = Player(name=name, index=len(self._players),
                                device_name=devices[len(self._players)])
                self._players.append(player)
                return player

        engine = cls.__new__(cls)
        tfe.set_config(_Config(["server0", "server1", "server2"], debug_mode=True))
        engine.prot = tfe.protocol.ABY3("server0", "server1", "server2")
        tfe.set_protocol(engine.prot)
        engine.devices = list(devices)
        engine.mesh = False  # one process: TensorFlow moves tensors between its devices
        engine._step_ids = StepIds()
        engine._check_encoding()
        return engine

    # -- shares in and out ----------------------------------------------------------------
    def _private(self, per_worker):
        """An ABY3 private tensor from each worker's pair of int64 tensors (on its device)."""
        from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType

        factory = self.prot.default_factory
        shares = [[factory.tensor(a), factory.tensor(b)] for a, b in per_worker]
        return ABY3PrivateTensor(self.prot, shares, True, ShareType.ARITHMETIC)

    def _weights(self, model_id, nodes):
        """Each node's weights: private tensors read from each worker's own variables."""
        out, k = [], 0
        for node in nodes:
            ws = []
            for shape in node["weight_shapes"]:
                per_worker = []
                for device in self.devices:
                    with tf.device(device):
                        per_worker.append([store.read_weight(model_id, k, j, shape)
                                           for j in range(store.SHARES)])
                ws.append(self._private(per_worker))
                k += 1
            out.append(ws)
        return out

    def build_step(self, spec, group):
        """The traced private evaluation of ``group`` queries at once (their batches
        concatenated): a :class:`Step`."""
        model_id = spec["model_id"]
        in_shape, out_shape = list(spec["input_shape"]), list(spec["output_shape"])
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        w_in, w_out = store.SHARES * n_in, store.SHARES * n_out
        batch = in_shape[0]
        devices, nodes = self.devices, spec["nodes"]
        exact = layers.exact_output([n["kind"] for n in nodes])
        want = self.encoding.frac_bits * (2 if exact else 1)
        if spec.get("output_frac_bits", self.encoding.frac_bits) != want:
            raise ValueError("the model's spec says its answer has {} fractional bits; this "
                             "worker computes {}: owner and workers run different "
                             "privatekeras versions".format(spec.get("output_frac_bits"), want))
        answers = []  # names of the answer tensors, one per worker

        @tf.function
        def step(step_id, rows0, rows1, rows2):
            """Private evaluation of ``group`` queries: ``rows<i>`` is worker i's input
            shares (one row per query, its pair of shares flattened), the answer shares come
            out the same way per worker; ``step_id`` tags this execution's messages between
            workers."""
            self.prot.reset()  # fresh pairwise PRF keys for this execution
            weights = self._weights(model_id, nodes)
            per_worker = []
            for device, rows in zip(devices, (rows0, rows1, rows2)):
                with tf.device(device):
                    rows = tf.reshape(rows, [group, store.SHARES, n_in])
                    per_worker.append([tf.reshape(rows[:, j], [group * batch] + in_shape[1:])
                                       for j in range(store.SHARES)])
            y = forward(self.prot, nodes, weights, self._private(per_worker), exact)
            out = []
            for i, device in enumerate(devices):
                with tf.device(device):
                    pair = [tf.reshape(y.unwrapped[i][j].value, [group, n_out])
                            for j in range(store.SHARES)]
                    out.append(tf.reshape(tf.stack(pair, axis=1), [group, w_out],
                                          name="answer{}".format(i)))
            answers[:] = [t.name for t in out]
            graph = tf.compat.v1.get_default_graph()
            if self.mesh:
                routing.route(graph, devices, step_id)
            if os.environ.get(UNCHAIN_ENV, "1") != "0":
                _unchain(graph)
            # In one process the step returns the answers. Routed for the cluster it returns
            # nothing (its outputs would be ops on no worker's device): each worker's part
            # fetches its own answer rows by name.
            return None if self.mesh else out

        rows = tf.TensorSpec([group, w_in], tf.int64)
        concrete = step.get_concrete_function(tf.TensorSpec([], tf.int64), rows, rows, rows)
        traced = Step(concrete, self._step_ids, devices, answers, (group, w_in, w_out))
        path = os.environ.get(STATS_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(dict(traced.stats(), group=group, batch=batch)) + "\n")
        return traced


class StepIds:
    """Increasing ids for the executions of an engine's steps (nanoseconds of the clock, or
    one more than the last): the workers' mesh drops messages of earlier steps."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last = 0

    def next(self):
        with self._lock:
            self._last = max(self._last + 1, time.time_ns())
            return self._last


class Step:
    """A traced private step for groups of ``group`` queries.

    ``concrete`` is the whole traced function (the three workers' ops), :meth:`stats` what it
    costs (:mod:`privatekeras.mpc.graphstats`), :meth:`plan` a digest of its messages between
    workers. In one process (:meth:`ABY3Engine.in_process`), ``step(rows)`` runs it whole;
    on the cluster each worker runs only :meth:`part` ``(its index)``."""

    def __init__(self, concrete, step_ids, devices, answers, sizes):
        self.concrete = concrete
        self.group, self.in_width, self.out_width = sizes
        self._ids = step_ids
        self._devices = list(devices)
        self._answers = list(answers)
        self._parts = {}

    def __call__(self, rows):
        """Run the whole step in this process (an engine made by
        :meth:`ABY3Engine.in_process`): ``rows[i]`` is worker i's input rows (``[group,
        in_width]`` int64); returns the three workers' answer rows (numpy)."""
        out = self.concrete(tf.constant(self._ids.next(), tf.int64),
                            *[tf.constant(r, tf.int64) for r in rows])
        return [t.numpy() for t in out]

    def part(self, index):
        """Worker ``index``'s part (:mod:`privatekeras.mpc.partition`): a :class:`Part`."""
        if index not in self._parts:
            args = [t.op.name for t in self.concrete.inputs]
            fn = partition.part(self.concrete.graph, self._devices[index],
                                [args[0], args[1 + index]], self._answers[index])
            self._parts[index] = Part(fn, self)
        return self._parts[index]

    def plan(self):
        return partition.plan(self.concrete.graph)

    def stats(self):
        return graphstats.step_stats(self.concrete.graph, self._devices[0])


class Part:
    """One worker's part of a step: ``part(step_id, rows)`` runs it in this process (its
    messages to and from the other workers' parts go over the mesh under ``step_id``) and
    returns this worker's answer rows, ``[group, out_width]`` int64 (numpy)."""

    def __init__(self, fn, step):
        self._fn = fn
        self.group, self.in_width, self.out_width = step.group, step.in_width, step.out_width

    def __call__(self, step_id, rows):
        out = self._fn(tf.constant(step_id, tf.int64), tf.constant(rows, tf.int64))
        return out[0].numpy()


# Stateful ops that touch no other op's state: a variable's or a table's handle (the reads,
# writes and lookups through it are ordered by the handle), and fresh randomness (seeds,
# unseeded draws), and the mesh's sends and receives (matched by step id and edge number, not by
# order). tf.function's automatic control dependencies would run every stateful op
# without a resource input in program order, one after the other: across the three workers
# that is a chain of cross-process control messages (~35 sequential hops in the tutorial
# CNN's step: the key set-up, then 48 weight reads alternating between workers, then the
# tables) before the first layer may start. Marked independent, each still runs exactly once
# per execution of the step, before it returns.
INDEPENDENT_OPS = frozenset({"VarHandleOp", "MutableHashTableOfTensorsV2", "PkSecureSeed",
                             "PkRandomUniform", routing.SEND, routing.RECV})
UNCHAIN_ENV = "PRIVATEKERAS_UNCHAIN"  # "0": keep tf.function's chain (for comparisons)


def _unchain(graph):
    """Exempt the step's INDEPENDENT_OPS from the program-order chain (see above); returns
    how many were exempted."""
    acd = getattr(graph, "experimental_acd_manager", None)
    if acd is None:  # not tracing a tf.function: nothing is chained
        return 0
    done = {id(op) for op in acd._independent_ops}
    count = 0
    for op in graph.get_operations():
        if op.type in INDEPENDENT_OPS and id(op) not in done:
            acd.run_independently(op)
            count += 1
    return count


def forward(prot, nodes, weights, x, exact_output=False):
    """The private evaluation of the public node graph; ``x`` is the private input in Keras'
    layout. Each node is evaluated by its registry entry, in the step's layout (NCHW for 4-D
    tensors, see :mod:`privatekeras.layers`). ``exact_output``: the last node (a linear one,
    :func:`privatekeras.layers.exact_output`) returns its product untruncated, at double
    scale."""
    values = []
    x = layers.private_layout(prot, x)
    for k, (node, ws) in enumerate(zip(nodes, weights)):
        ins = [x if i == INPUT else values[i] for i in node["inputs"]]
        last = exact_output and k == len(nodes) - 1
        with untruncated_products() if last else contextlib.nullcontext():
            values.append(layers.by_kind(node["kind"]).forward(prot, node, ws, *ins))
    return layers.keras_layout(prot, values[-1])
