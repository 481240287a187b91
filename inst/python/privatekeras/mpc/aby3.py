"""The private step: TF Encrypted's ABY3 over the three workers, built and driven by worker 0.

Worker 0's process is the only one that builds graphs. It traces one step per group size:
the step takes a vector of query ids, reads each worker's input shares of those queries from
that worker's input table (on that worker's device), evaluates the model on the shares with
ABY3 (the weights read from each worker's own variables), and writes each worker's answer
shares to that worker's output table. Values cross between workers only as ABY3's protocol
messages; worker 0 never reads another worker's shares.

The pairwise PRF keys are set up inside the step (``prot.reset()``), so every execution draws
fresh masks from the CSPRNG kernels: keys made once at construction would be constants of the
traced graph and every query would reuse the same masks.
"""

import collections

import numpy as np
import tensorflow as tf

from . import store
from .encoding import FIXED64
from .tfe_compat import import_tfe

PROTOCOL = "aby3"


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
        self.prot = tfe.protocol.ABY3("server0", "server1", "server2")
        tfe.set_protocol(self.prot)
        self.devices = list(devices)
        fp = self.prot.fixedpoint_config
        assert (fp.scaling_base, fp.precision_fractional, fp.precision_integral) == (
            2, self.encoding.frac_bits, self.encoding.int_bits), "fixed-point mismatch"

    # -- shares in and out ----------------------------------------------------------------
    def _private(self, per_worker):
        """An ABY3 private tensor from each worker's pair of int64 tensors (on its device)."""
        from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType

        factory = self.prot.default_factory
        shares = [[factory.tensor(a), factory.tensor(b)] for a, b in per_worker]
        return ABY3PrivateTensor(self.prot, shares, True, ShareType.ARITHMETIC)

    def _weights(self, model_id, layers):
        out, k = [], 0
        for layer in layers:
            ws = []
            for shape in layer["weight_shapes"]:
                per_worker = []
                for i, device in enumerate(self.devices):
                    with tf.device(device):
                        pair = [store.read_weight(model_id, k, j, shape)
                                for j in range(store.SHARES)]
                        if layer["kind"] == "conv2d" and len(ws) == 1:
                            pair = [tf.reshape(p, [-1, 1, 1]) for p in pair]  # NCHW bias
                        per_worker.append(pair)
                ws.append(self._private(per_worker))
                k += 1
            out.append(ws)
        return out

    def build_step(self, spec, group):
        """The traced private evaluation of ``group`` queries at once (their batches
        concatenated), as a ``tf.function`` of a string vector of ``group`` query ids."""
        model_id = spec["model_id"]
        in_shape, out_shape = list(spec["input_shape"]), list(spec["output_shape"])
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        w_in, w_out = store.SHARES * n_in, store.SHARES * n_out
        batch = in_shape[0]
        devices, layers = self.devices, spec["layers"]

        @tf.function
        def step(keys):
            """Private evaluation of the queries ``keys``: shares in from each worker's
            input table, answer shares out to each worker's output table."""
            self.prot.reset()  # fresh pairwise PRF keys for this execution
            weights = self._weights(model_id, layers)
            per_worker = []
            for device in devices:
                with tf.device(device):
                    rows = store.take(store.table(model_id, "in", w_in), w_in, keys)
                    rows = tf.reshape(rows, [group, store.SHARES, n_in])
                    per_worker.append([tf.reshape(rows[:, j], [group * batch] + in_shape[1:])
                                       for j in range(store.SHARES)])
            y = forward(self.prot, layers, weights, self._private(per_worker))
            for i, device in enumerate(devices):
                with tf.device(device):
                    pair = [tf.reshape(y.unwrapped[i][j].value, [group, n_out])
                            for j in range(store.SHARES)]
                    store.insert(store.table(model_id, "out", w_out), keys,
                                 tf.reshape(tf.stack(pair, axis=1), [group, w_out]))

        step.get_concrete_function(tf.TensorSpec([group], tf.string))
        return step


def forward(prot, layers, weights, x):
    """The private forward pass over the public layer list; ``x`` is a private NHWC (or 2-D)
    tensor. Convolutions run in NCHW, as TF Encrypted does."""
    batch = int(x.shape[0])
    nchw = len(x.shape) == 4
    if nchw:
        x = prot.transpose(x, perm=[0, 3, 1, 2])
    for layer, ws in zip(layers, weights):
        kind, params = layer["kind"], layer.get("params", {})
        if kind == "conv2d":
            x = prot.conv2d(x, ws[0], tuple(params["strides"]), params["padding"]) + ws[1]
        elif kind == "dense":
            x = prot.matmul(x, ws[0]) + ws[1]
        elif kind == "relu":
            x = prot.relu(x)
        elif kind == "avgpool":
            x = prot.avgpool2d(x, tuple(params["pool_size"]), tuple(params["strides"]),
                               params["padding"])
        elif kind == "maxpool":
            x = prot.maxpool2d(x, tuple(params["pool_size"]), tuple(params["strides"]),
                               params["padding"])
        elif kind in ("flatten", "reshape"):
            if nchw:
                x = prot.transpose(x, perm=[0, 2, 3, 1])
                nchw = False
            target = [-1] if kind == "flatten" else list(params["target_shape"])
            x = prot.reshape(x, [batch] + target)
            if len(x.shape) == 4:
                x = prot.transpose(x, perm=[0, 3, 1, 2])
                nchw = True
        else:  # the owner's convert() only emits the kinds above
            raise ValueError("unknown layer kind " + kind)
    if nchw:
        x = prot.transpose(x, perm=[0, 2, 3, 1])
    return x
