"""Protocol backends: how values are shared among the workers and how layers run on shares.

Each backend has two halves:

* the client half (numpy only, no TF Encrypted): fixed-point encoding, splitting an input
  into shares with the OS CSPRNG, which shares each worker receives, and reconstruction;
* the model-owner half (TF Encrypted): the protocol object, private weights and the private
  forward pass over :class:`~privatekeras.convert.LayerSpec` lists.

ABY3 (replicated three-party sharing over Z_2^64) is the default. SecureNN is offered too
(two-party additive sharing on workers 0 and 1, worker 2 as crypto producer for triples and
the comparison protocol). Pond is deliberately not offered: its ReLU is a polynomial
approximation that gives wrong answers on real CNNs.
"""

import os

import numpy as np

from .errors import InputError

PROTOCOLS = ("aby3", "securenn")


def check_protocol(protocol):
    """Validate a protocol name and return it normalised."""
    name = str(protocol).lower()
    if name == "pond":
        raise ValueError("protocol 'pond' is not offered: its ReLU is a polynomial approximation "
                         "that gives wrong predictions; use 'aby3'")
    if name not in PROTOCOLS:
        raise ValueError("unknown protocol {!r}; choose one of {}".format(protocol, PROTOCOLS))
    return name


def random_ring_elements(shape):
    """Uniform int64 values (the ring Z_2^64) from the OS CSPRNG (getrandom)."""
    n = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(os.urandom(8 * n), dtype=np.int64).reshape(shape).copy()


class FixedPointLayout:
    """Client half shared by the backends: fixed-point encoding in Z_2^64.

    A value x is encoded as round(x * base^frac) and must stay below base^int in magnitude.
    """

    base = 2
    frac_digits = 16
    int_digits = 11
    share_counts = (2, 2, 2)  # shares each worker receives

    @classmethod
    def scale(cls):
        return float(cls.base ** cls.frac_digits)

    @classmethod
    def bound(cls):
        return float(cls.base ** cls.int_digits)

    @classmethod
    def encode(cls, x):
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise InputError("the input contains NaN or infinite values")
        limit = cls.bound()
        big = np.abs(x).max(initial=0.0)
        if big >= limit:
            raise InputError(
                "input values must lie within (-{0:g}, {0:g}) for the fixed-point encoding "
                "({1}^{2}); the largest magnitude here is {3:g}. Rescale the input (as the "
                "model was trained on it).".format(limit, cls.base, cls.int_digits, big)
            )
        return np.round(x * cls.scale()).astype(np.int64)

    @classmethod
    def decode(cls, z):
        return z.astype(np.float64) / cls.scale()


class ABY3Layout(FixedPointLayout):
    """Client half of ABY3: x = x0 + x1 + x2 (mod 2^64); worker i holds (x_i, x_{i+1}).

    TFE's fixed64_heuristic: 16 fractional and 11 integral bits.
    """

    name = "aby3"

    @classmethod
    def split(cls, x):
        """Encode and share ``x``; returns, per worker, the tuple of shares it receives."""
        v = cls.encode(x)
        s0 = random_ring_elements(v.shape)
        s1 = random_ring_elements(v.shape)
        with np.errstate(over="ignore"):
            s2 = v - s0 - s1  # wraps mod 2^64
        s = [s0, s1, s2]
        return [(s[i], s[(i + 1) % 3]) for i in range(3)]

    @classmethod
    def reconstruct(cls, per_worker):
        """Rebuild the value from each worker's share pair, checking the replicas agree."""
        for i in range(3):
            if not np.array_equal(per_worker[i][1], per_worker[(i + 1) % 3][0]):
                raise RuntimeError(
                    "the workers' shares of the answer are inconsistent (worker {} and {} hold "
                    "different copies of the same share): a worker is faulty".format(
                        i, (i + 1) % 3)
                )
        with np.errstate(over="ignore"):
            z = per_worker[0][0] + per_worker[1][0] + per_worker[2][0]
        return cls.decode(z)


class SecureNNLayout(FixedPointLayout):
    """Client half of SecureNN: x = x0 + x1 (mod 2^64) on workers 0 and 1; worker 2 (the
    crypto producer) never holds a share of the input or the output.

    TFE's fixed64 for Pond/SecureNN: base 3, 8 fractional and 7 integral digits.
    """

    name = "securenn"
    base = 3
    frac_digits = 8
    int_digits = 7
    share_counts = (1, 1, 0)

    @classmethod
    def split(cls, x):
        v = cls.encode(x)
        s0 = random_ring_elements(v.shape)
        with np.errstate(over="ignore"):
            s1 = v - s0
        return [(s0,), (s1,), ()]

    @classmethod
    def reconstruct(cls, per_worker):
        with np.errstate(over="ignore"):
            z = per_worker[0][0] + per_worker[1][0]
        return cls.decode(z)


LAYOUTS = {"aby3": ABY3Layout, "securenn": SecureNNLayout}


class TFEEngine:
    """Model-owner half: a TF Encrypted protocol on the cluster's three workers."""

    layout = None

    def __init__(self, cluster):
        from collections import OrderedDict

        from .tfe_compat import import_tfe

        tfe = import_tfe()
        # debug_mode disables TFE's global memoisation of protocol nodes, which would hand
        # tensors of an earlier trace to a later one.
        hostmap = OrderedDict(("server{}".format(i), h) for i, h in enumerate(cluster.hosts))
        tfe.set_config(tfe.RemoteConfig(hostmap, job_name=cluster.job_name, debug_mode=True))
        self.tfe = tfe
        self.prot = self.make_protocol(tfe)
        tfe.set_protocol(self.prot)
        self.devices = cluster.devices
        fp = self.prot.fixedpoint_config
        assert (fp.scaling_base, fp.precision_fractional, fp.precision_integral) == (
            self.layout.base, self.layout.frac_digits, self.layout.int_digits)

    def make_protocol(self, tfe):
        raise NotImplementedError

    def fresh_randomness(self):
        """Hook run at the start of every traced private step."""
        return None

    def private_weights(self, layers):
        """Secret-share every weight from this process onto the workers."""
        out = []
        for spec in layers:
            ws = []
            for k, w in enumerate(spec.weights):
                if spec.kind == "conv2d" and k == 1:
                    w = w.reshape(-1, 1, 1)  # bias over NCHW activations
                ws.append(self.prot.define_private_variable(np.asarray(w, dtype=np.float64)))
            out.append(ws)
        return out

    def forward(self, layers, weights, x):
        """The private forward pass; x is a private NHWC (or 2-D) tensor."""
        prot = self.prot
        batch = int(x.shape[0])
        nchw = len(x.shape) == 4
        if nchw:
            x = prot.transpose(x, perm=[0, 3, 1, 2])
        for spec, ws in zip(layers, weights):
            kind = spec.kind
            if kind == "conv2d":
                x = prot.conv2d(x, ws[0], tuple(spec.params["strides"]), spec.params["padding"])
                x = x + ws[1]
            elif kind == "dense":
                x = prot.matmul(x, ws[0]) + ws[1]
            elif kind == "relu":
                x = prot.relu(x)
            elif kind == "avgpool":
                x = prot.avgpool2d(x, spec.params["pool_size"], spec.params["strides"],
                                   spec.params["padding"])
            elif kind == "maxpool":
                x = prot.maxpool2d(x, spec.params["pool_size"], spec.params["strides"],
                                   spec.params["padding"])
            elif kind in ("flatten", "reshape"):
                if nchw:
                    x = prot.transpose(x, perm=[0, 2, 3, 1])
                    nchw = False
                target = [-1] if kind == "flatten" else list(spec.params["target_shape"])
                x = prot.reshape(x, [batch] + target)
                if len(x.shape) == 4:
                    x = prot.transpose(x, perm=[0, 3, 1, 2])
                    nchw = True
            else:  # pragma: no cover - convert() only emits the kinds above
                raise ValueError("unknown layer kind " + kind)
        if nchw:
            x = prot.transpose(x, perm=[0, 2, 3, 1])
        return x


class ABY3Engine(TFEEngine):
    """ABY3 on TF Encrypted's implementation."""

    layout = ABY3Layout

    def make_protocol(self, tfe):
        return tfe.protocol.ABY3("server0", "server1", "server2")

    def fresh_randomness(self):
        """Re-key ABY3's pairwise PRFs inside the traced step, so each query uses new keys.

        Keys drawn once at construction would be constants of the traced graph, and every
        query would reuse the same masks.
        """
        self.prot.reset()

    def wrap_input(self, per_worker):
        """ABY3 private tensor from the (x_i, x_{i+1}) pairs dequeued on each worker."""
        from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType

        factory = self.prot.default_factory
        shares = [[factory.tensor(a), factory.tensor(b)] for a, b in per_worker]
        return ABY3PrivateTensor(self.prot, shares, True, ShareType.ARITHMETIC)

    @staticmethod
    def unwrap_output(y):
        return [(y.unwrapped[i][0].value, y.unwrapped[i][1].value) for i in range(3)]


class SecureNNEngine(TFEEngine):
    """SecureNN on TF Encrypted's implementation (worker 2 is the crypto producer)."""

    layout = SecureNNLayout

    def make_protocol(self, tfe):
        return tfe.protocol.SecureNN()  # players server0..2 from the config

    def wrap_input(self, per_worker):
        from tf_encrypted.protocol.pond import PondPrivateTensor

        factory = self.prot.tensor_factory
        return PondPrivateTensor(self.prot, factory.tensor(per_worker[0][0]),
                                 factory.tensor(per_worker[1][0]), True)

    @staticmethod
    def unwrap_output(y):
        return [(y.share0.value,), (y.share1.value,), ()]


ENGINES = {"aby3": ABY3Engine, "securenn": SecureNNEngine}
