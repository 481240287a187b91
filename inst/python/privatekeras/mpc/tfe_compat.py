"""Import TF Encrypted 0.9.1 on stock TensorFlow, with privatekeras' secure kernels.

TFE 0.9.1 was built against a patched TensorFlow: ABY3 imports ``glob_stateful_parallelism``
from ``while_v2`` and passes ``stateful_parallelism=`` to ``_build_while_op``; Pond's pooling
uses the TF1-only ``tf.Dimension``. We add those names before importing TFE, then replace its
``secure_random`` and ``aux`` op modules (which it could not load) with our own kernels.

Products of shares go through our ring kernels (``kernels/pk_ring.cc``): the int64 factory's
``matmul``, ``conv2d`` and ``im2col`` (every share-by-public product; the pools' windows), and
ABY3's private-by-private ``matmul`` and ``conv2d``, where party i computes its three share
products x_i*y_i + x_i*y_{i+1} + x_{i+1}*y_i as one kernel call x_i*(y_i + y_{i+1}) +
x_{i+1}*y_i (the same ring arithmetic, so the same bits; the zero-sharing masks and the
re-sharing are TFE's, unchanged, drawn in the same order from the same PRFs). ABY3's carry
circuit (the bit decomposition of ReLU) runs on fused kernels (``kernels/pk_fused.cc``, see
``_use_fused_carry``), and so do ReLU as a whole (:func:`relu`) and the truncation of each
product (``mpc/truncation.py``, ``kernels/pk_trunc.cc``): one op per party per round.
``PRIVATEKERAS_RING_KERNELS=0`` / ``PRIVATEKERAS_FUSED_CARRY=0`` keep TFE's own code (the
second turns off all three fused protocols), for comparisons.

Only worker 0, which builds the private step, imports TF Encrypted; every worker loads the
kernels (the ops run on all three).
"""

import contextlib
import functools
import logging
import os
import threading
import warnings


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="tf_encrypted")
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")


def _patch_tensorflow(tf):
    from tensorflow.python.ops import while_v2

    if not hasattr(while_v2, "glob_stateful_parallelism"):
        while_v2.glob_stateful_parallelism = False
    build = while_v2._build_while_op
    if not getattr(build, "_privatekeras_shim", False):

        def _build_while_op(*args, stateful_parallelism=None, **kwargs):
            return build(*args, **kwargs)

        _build_while_op._privatekeras_shim = True
        while_v2._build_while_op = _build_while_op
    if not hasattr(tf, "Dimension"):
        tf.Dimension = int


@functools.lru_cache(maxsize=None)
def import_tfe():
    """Return the ``tf_encrypted`` module, patched and running on our secure kernels.

    Raises ``privatekeras.kernels.KernelsMissingError`` when the kernels are not built:
    privatekeras never runs on insecure randomness.
    """
    from ..kernels import loader

    _quiet_tensorflow()
    module = loader.load()  # refuse before TFE can fall back to tf.random
    import tensorflow as tf

    _patch_tensorflow(tf)
    tfe_logger = logging.getLogger("tf_encrypted")
    level = tfe_logger.level
    # TFE warns that it falls back to insecure randomness when its own ops are missing; we
    # replace those ops right below, before any randomness is drawn.
    tfe_logger.setLevel(logging.CRITICAL)
    try:
        import tf_encrypted as tfe
        from tf_encrypted.operations.aux import aux as tfe_aux
        from tf_encrypted.operations.secure_random import secure_random as tfe_secure_random
    finally:
        tfe_logger.setLevel(level)

    tfe_secure_random.secure_random_module = loader.SecureRandomModule(module)
    tfe_aux.aux_module = loader.AuxModule(module)
    import tf_encrypted.operations.aux as aux_pkg

    aux_pkg.aux_module = tfe_aux.aux_module
    if not tfe_secure_random.supports_secure_randomness():  # pragma: no cover - invariant
        raise RuntimeError("secure randomness is not active; refusing to continue")
    _share_draw_constants(module)
    if os.environ.get(RING_ENV, "1") != "0":
        _use_ring_kernels(module)
    if os.environ.get(FUSED_ENV, "1") != "0":
        import tf_encrypted.protocol.aby3.aby3 as aby3_mod

        _use_fused_carry(module, aby3_mod)
    return tfe


def _share_draw_constants(module):
    """One set of constants per device for TF Encrypted's seeded draws.

    Every ``seeded_random_uniform`` call made three constant ops (the shape and the two
    bounds) next to its draw: 171 of the tutorial CNN step's ~1,100 ops, ~60 of them distinct.
    Inside a traced graph, a draw now takes them from a per-graph cache keyed by device, dtype
    and value. Same draws, same bits; only when the device scope is one plain device string
    (as every party's scope is) and the arguments are plain numbers: otherwise TF Encrypted's
    own function runs."""
    import weakref

    import tensorflow as tf
    import tf_encrypted.operations.secure_random as package

    original = package.seeded_random_uniform
    if getattr(original, "_privatekeras_shared", False):
        return
    made = weakref.WeakKeyDictionary()  # graph -> {(device, dtype, value): constant}

    def seeded_random_uniform(shape, minval=0, maxval=None, dtype=tf.int32, seed=None,
                              name=None):
        graph = tf.compat.v1.get_default_graph()
        device = None if tf.executing_eagerly() else _scope_device(graph)
        if isinstance(shape, tf.TensorShape) and shape.is_fully_defined():
            shape = shape.as_list()
        plain = (device is not None and seed is not None and
                 isinstance(shape, (list, tuple)) and
                 all(isinstance(v, int) for v in list(shape) + [minval, maxval]) and
                 tf.as_dtype(dtype) in (tf.int8, tf.int16, tf.int32, tf.int64))
        if not plain:
            return original(shape, minval=minval, maxval=maxval, dtype=dtype, seed=seed,
                            name=name)
        dtype, consts = tf.as_dtype(dtype), made.setdefault(graph, {})

        def const(value, kind):
            key = (device, kind.name, value)
            if key not in consts:
                with tf.device(device):
                    consts[key] = tf.constant(value, kind)
            return consts[key]

        return module.pk_seeded_random_uniform(const(tuple(shape), tf.int32), seed,
                                               const(minval, dtype), const(maxval, dtype),
                                               name=name)

    seeded_random_uniform._privatekeras_shared = True
    package.seeded_random_uniform = seeded_random_uniform


def _scope_device(graph):
    """The device the current ``tf.device`` scope gives a new op when the innermost scope is
    one fully specified device string; None otherwise (no scope, a device function, a
    partial spec merged with outer ones)."""
    import tensorflow as tf

    try:
        for spec in graph._device_function_stack.peek_objs():  # innermost first
            if spec.is_null_merge:
                continue
            if not spec.raw_string:
                return None
            device = tf.DeviceSpec.from_string(spec.raw_string)
            full = device.job and device.task is not None and device.device_type
            return device.to_string() if full else None
    except (AttributeError, ValueError):
        return None
    return None


# PRIVATEKERAS_RING_KERNELS=0 keeps TF Encrypted's own int64 products (for comparisons: the
# bits are the same, only the speed differs). PRIVATEKERAS_RING_ISA (avx512, avx2, generic)
# forces one code path of the kernels (see pk_ring.cc).
RING_ENV = "PRIVATEKERAS_RING_KERNELS"
# TFE's own functions the ring kernels replace, by name (for the tests' comparisons).
TFE_ORIGINALS = {}


def _strides(strides):
    if isinstance(strides, int):
        return [strides, strides]
    return [int(s) for s in strides]


def _use_ring_kernels(module):
    """Route TFE's int64 products through PkRingMatMul / PkRingConv2D (see the docstring)."""
    import tensorflow as tf
    import tf_encrypted.protocol.aby3.aby3 as aby3_mod
    from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor
    from tf_encrypted.tensor import int64factory

    tensor_cls = type(int64factory.tensor(0, encode=False))  # a wrapper: no TF op is made
    if getattr(tensor_cls, "_privatekeras_ring", False):
        return
    tfe_matmul, tfe_conv2d, tfe_im2col = tensor_cls.matmul, tensor_cls.conv2d, tensor_cls.im2col

    def is_int64(*values):
        return all(isinstance(v, tensor_cls) and v.value.dtype == tf.int64 for v in values)

    def matmul(self, other):
        if is_int64(self, other) and len(self.shape) == 2 and len(other.shape) == 2:
            return tensor_cls(module.pk_ring_mat_mul([self.value], [other.value]))
        return tfe_matmul(self, other)

    def conv2d(self, other, strides, padding="SAME"):
        # TFE's generic conv2d: x in NCHW, the filter [kh, kw, C, O], the output NCHW.
        if is_int64(self, other):
            return tensor_cls(module.pk_ring_conv2d(
                [self.value], [other.value], strides=_strides(strides), padding=padding,
                data_format="NCHW"))
        return tfe_conv2d(self, other, strides, padding)

    def im2col(self, h_filter, w_filter, strides, padding):
        # TFE's layout (x NCHW): rows (c, dy, dx), columns (oy, ox, n).
        if is_int64(self) and len(self.shape) == 4:
            return tensor_cls(module.pk_ring_im2_col(
                self.value, window=[int(h_filter), int(w_filter)], strides=_strides(strides),
                padding=padding))
        return tfe_im2col(self, h_filter, w_filter, strides, padding)

    def mine(fn):
        fn._privatekeras_ring = True
        return fn

    @mine
    def matmul_private_private(prot, x, y):
        if not (x.backing_dtype is int64factory and len(x.shape) == 2 and len(y.shape) == 2):
            return tfe_matmul_pp(prot, x, y)
        xs, ys = x.unwrapped, y.unwrapped
        with tf.name_scope("matmul"):
            a = prot._gen_zero_sharing(tf.TensorShape((*x.shape[:-1], y.shape[-1])))
            z = [None] * 3
            for i in range(3):
                with tf.device(prot.servers[i].device_name):
                    z[i] = tensor_cls(module.pk_ring_mat_mul(
                        [xs[i][0].value, xs[i][1].value],
                        [ys[i][0].value + ys[i][1].value, ys[i][0].value])) + a[i]
            return _reshare(prot, x, y, z)

    @mine
    def conv2d_private_private(prot, x, w, strides, padding):
        if x.backing_dtype is not int64factory:
            return tfe_conv2d_pp(prot, x, w, strides, padding)
        xs, ws = x.unwrapped, w.unwrapped
        with tf.name_scope("conv2d"):
            y = [None] * 3
            for i in range(3):
                with tf.device(prot.servers[i].device_name):
                    y[i] = tensor_cls(module.pk_ring_conv2d(
                        [xs[i][0].value, xs[i][1].value],
                        [ws[i][0].value + ws[i][1].value, ws[i][0].value],
                        strides=_strides(strides), padding=padding, data_format="NCHW"))
            a = prot._gen_zero_sharing(y[0].shape)
            z = [None] * 3
            for i in range(3):
                with tf.device(prot.servers[i].device_name):
                    z[i] = y[i] + a[i]
            return _reshare(prot, x, w, z)

    def _reshare(prot, x, y, z):
        """TFE's re-sharing of a product (party i sends its z_i to party i - 1), then its
        truncation when both factors carry a scale."""
        shares = [[None, None], [None, None], [None, None]]
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                shares[i][0] = z[i]
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                shares[i][1] = z[(i + 1) % 3].identity()
        out = ABY3PrivateTensor(prot, shares, x.is_scaled or y.is_scaled, x.share_type)
        if not (x.is_scaled and y.is_scaled):
            return out
        if _UNTRUNCATED.active:
            setattr(out, DOUBLE, True)
            return out
        if _fused_kernels_on():
            from .truncation import truncate

            truncated = truncate(prot, out)
        else:
            truncated = prot.truncate(out)
        setattr(truncated, EXACT, out)  # see relu()
        return truncated

    tfe_matmul_pp = aby3_mod._matmul_private_private
    tfe_conv2d_pp = aby3_mod._conv2d_private_private
    TFE_ORIGINALS.update({"matmul": tfe_matmul, "conv2d": tfe_conv2d, "im2col": tfe_im2col,
                          "matmul_private_private": tfe_matmul_pp,
                          "conv2d_private_private": tfe_conv2d_pp})
    tensor_cls.matmul, tensor_cls.conv2d, tensor_cls.im2col = matmul, conv2d, im2col
    aby3_mod._matmul_private_private = matmul_private_private
    aby3_mod._conv2d_private_private = conv2d_private_private
    tensor_cls._privatekeras_ring = True


class _Flag(threading.local):
    active = False


_UNTRUNCATED = _Flag()
DOUBLE = "_privatekeras_double"  # set on a product left at double scale


@contextlib.contextmanager
def untruncated_products():
    """While active (in the tracing thread), ring-kernel products of two scaled tensors are
    re-shared but not truncated: at double scale (2f fractional bits), marked DOUBLE, and a
    bias added with :func:`add_bias` is lifted to match. For the model's last layer, whose
    answer the client decodes itself (privatekeras.layers.exact_output)."""
    import tf_encrypted.protocol.aby3.aby3 as aby3_mod

    if not getattr(aby3_mod._matmul_private_private, "_privatekeras_ring", False):
        raise RuntimeError("an untruncated last layer needs the ring kernels (unset {}=0 "
                           "on worker 0)".format(RING_ENV))
    _UNTRUNCATED.active = True
    try:
        yield
    finally:
        _UNTRUNCATED.active = False


# A product's value before its truncation, at double scale (2f fractional bits), re-shared
# one round after the product and two rounds before the truncated value: kept on the
# truncated tensor under this attribute by the ring kernels' products, carried through a
# bias by add_bias(), and read by relu().
EXACT = "_privatekeras_exact"


def map_shares(prot, x, fn):
    """Private ``x`` with ``fn`` applied to each of its shares (a TFE backing tensor) by the
    worker holding it, on that worker's device: for maps that are linear in the ring, so that
    the results are shares of the mapped value."""
    import tensorflow as tf

    shares = [[None, None], [None, None], [None, None]]
    for i, pair in enumerate(x.unwrapped):
        with tf.device(prot.servers[i].device_name):
            shares[i] = [fn(s) for s in pair]
    return type(x)(prot, shares, x.is_scaled, x.share_type)


def _lift(prot, x, bits):
    """Private ``x`` times 2^bits: each share shifted left (exact in the ring)."""
    import tensorflow as tf

    return map_shares(prot, x, lambda s: s.factory.tensor(tf.bitwise.left_shift(
        s.value, tf.constant(bits, s.value.dtype))))


def add_bias(prot, y, bias):
    """``y + bias`` for a product ``y`` and a private bias broadcast over it. A product at
    double scale (DOUBLE) gets ``bias * 2^f``; one that carries its exact value (EXACT)
    gets a sum that carries ``exact + bias * 2^f`` too."""
    frac = prot.fixedpoint_config.precision_fractional
    if getattr(y, DOUBLE, False):
        return y + _lift(prot, bias, frac)
    out = y + bias
    exact = getattr(y, EXACT, None)
    if exact is not None:
        setattr(out, EXACT, exact + _lift(prot, bias, frac))
    return out


def relu(prot, x):
    """ABY3's ReLU, ``select(x > 0, 0, x)``, with the comparison made on ``x``'s exact value
    when it carries one (a product's, see EXACT). That value has the same sign and needs no
    truncation, so the comparison's bit decomposition (seven rounds) starts as soon as the
    product is re-shared and runs alongside the truncation (two rounds) instead of after it.
    The heuristic truncation already requires |x| * 2^2f < 2^62, so its sign bit is right."""
    exact = getattr(x, EXACT, None)
    if _fused_kernels_on() and fusable(x) and (exact is None or fusable(exact, x.shape)):
        return _fused_relu(prot, x if exact is None else exact, x)
    if exact is None:
        return prot.relu(x)
    import tensorflow as tf

    with tf.name_scope("relu"):
        return prot.select(exact > 0, 0, x)


def _fused_kernels_on():
    """True when TF Encrypted runs on the fused kernels (``PRIVATEKERAS_FUSED_CARRY`` unset
    or not 0 when it was imported): the carry circuit, ReLU and the products' truncation."""
    import tf_encrypted.protocol.aby3.aby3 as aby3_mod

    return getattr(aby3_mod._carry_computation, "_privatekeras_fused", False)


def fusable(t, shape=None):
    """True for a private ABY3 tensor the fused kernels take: arithmetic, int64 shares, a
    fully defined shape (``shape``, when given)."""
    from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType
    from tf_encrypted.tensor import int64factory

    return (isinstance(t, ABY3PrivateTensor) and t.share_type == ShareType.ARITHMETIC
            and t.backing_dtype is int64factory and t.shape.is_fully_defined()
            and (shape is None or t.shape == shape))


def _fused_relu(prot, v, x):
    """``x * (v > 0)`` for private ``v`` and ``x`` of one shape: ABY3's ReLU (TF Encrypted's
    ``select(v > 0, 0, x)``: the msb of -v by bit extraction, then the selection by bit
    injection) on the fused kernels of pk_fused.cc, one op per party per round:

    ========================  =========================================  ================
    round (party i sends)      op on party i                              PRF words read
    ========================  =========================================  ================
    1  u's boolean sharing     PkMsbShare: u ^ a_0 (party 0; u is          [0, n)
       (to i - 1)              -(v_0 + v_1)) or a_i (a: a zero-sharing)
    2  the first AND (i - 1)   PkMsbBegin (w = -v_2 needs no message)      [n, 2n)
    3-8  six carry levels      PkCarryLevel, 64 -> 2 bits                  n + n/2 + ...
    9  the OT messages         PkReluSend (to i + 1 and to i - 1)          6n
    -  the result's shares     PkReluFinish (local)                        (same 6n)
    ========================  =========================================  ================

    Every word is read from party i's two pairwise-PRF streams (drawn once per call, each
    use its own range, as in the carry); the messages are the same as TF Encrypted's but the
    OT's output shares are drawn by the sender from the PRFs (ABY3's bit injection) instead
    of a zero-sharing sent around: 96 bytes per element in round 9 instead of 128."""
    import tensorflow as tf
    from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType
    from tf_encrypted.tensor import int64factory

    from ..kernels import loader

    module = loader.load()
    n = int(x.shape.num_elements())
    # share, begin, the levels, then the selection's 6n words
    starts = word_ranges(n, [64, 64] + [64 >> j for j in range(CARRY_LEVELS)])
    select_at = starts[-1]
    vs, xs = v.unwrapped, x.unwrapped
    with tf.name_scope("relu"):
        f = pairwise_streams(prot, select_at + 6 * n)
        c = []
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                own = [vs[0][0].value, vs[0][1].value] if i == 0 else []
                c.append(module.pk_msb_share(own, f[i][0], f[i][1], party=i,
                                             offset=starts[0], shape=x.shape))
        z, keep, top = [None] * 3, [None] * 3, [None] * 3
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                z[i], keep[i], top[i] = module.pk_msb_begin(
                    c[i], c[(i + 1) % 3], vs[i][0].value, vs[i][1].value, f[i][0], f[i][1],
                    party=i, offset=starts[1])
        z, keep = _carry_levels(module, prot, z, keep, f, starts[2:])
        sent = []
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                sent.append(module.pk_relu_send(
                    z[i], z[(i + 1) % 3], keep[i], top[i], xs[i][0].value, xs[i][1].value,
                    f[i][0], f[i][1], party=i, offset=select_at))
        shares = [None] * 3
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                own, nxt = module.pk_relu_finish(
                    sent[(i + 2) % 3][0], sent[(i + 1) % 3][1], sent[i][2], f[i][0], f[i][1],
                    party=i, offset=select_at)
                shares[i] = [int64factory.tensor(own, encode=False),
                             int64factory.tensor(nxt, encode=False)]
        return ABY3PrivateTensor(prot, shares, x.is_scaled, ShareType.ARITHMETIC)


def sum_pool_nchw(t, pool_size, strides):
    """The sum of each VALID window of an NCHW tensor ``t`` (a TFE backing tensor, one share)
    of ``pool_size`` at ``strides``: local ring arithmetic, exact mod 2^64."""
    batch, channels, height, width = (int(d) for d in t.shape)
    cols = t.reshape([batch * channels, 1, height, width]).im2col(
        pool_size[0], pool_size[1], list(strides), "VALID")  # rows (dy, dx), cols (oy, ox, n)
    rows = (height - pool_size[0]) // strides[0] + 1
    columns = (width - pool_size[1]) // strides[1] + 1
    y = cols.reduce_sum(axis=0).reshape([rows, columns, batch, channels])
    return y.transpose([2, 3, 0, 1])


def pad_private(prot, x, paddings):
    """Private ``x`` padded with zeros (``paddings`` as for ``tf.pad``): each worker pads its
    own shares (shares of zero are zeros), one op per share; TF Encrypted's own pad builds a
    public zero tensor and adds it, dozens of ops."""
    import tensorflow as tf

    return map_shares(prot, x, lambda s: s.factory.tensor(tf.pad(s.value, paddings)))


def sum_pool_private(prot, x, pool_size, strides):
    """:func:`sum_pool_nchw` of every share of private ``x`` (each worker on its own)."""
    return map_shares(prot, x, lambda s: sum_pool_nchw(s, pool_size, strides))


# PRIVATEKERAS_FUSED_CARRY=0 keeps TF Encrypted's own carry circuit (for comparisons).
FUSED_ENV = "PRIVATEKERAS_FUSED_CARRY"
CARRY_LEVELS = 6  # 64 -> 32 -> ... -> 1 bits
_LEVEL_DTYPE = {64: "int64", 32: "int32", 16: "int16"}  # a level's output; int8 below 16


def _use_fused_carry(module, aby3_mod):
    """ABY3's carry circuit (the bit decomposition behind ReLU and MSB) with one fused kernel
    per party per level (kernels/pk_fused.cc): the same ANDs, masked by the same kind of
    zero-sharing from the pairwise PRFs, with both ANDs of a level packed into one message.
    Other carries (public operands, other widths) stay TF Encrypted's."""
    import tensorflow as tf
    from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType
    from tf_encrypted.tensor import int8factory, int64factory

    tfe_carry = aby3_mod._carry_computation
    if getattr(tfe_carry, "_privatekeras_fused", False):
        return
    def carry(prot, x, y, pos=None):
        if not (isinstance(x, ABY3PrivateTensor) and isinstance(y, ABY3PrivateTensor)
                and x.backing_dtype is int64factory and y.backing_dtype is int64factory
                and x.shape.is_fully_defined() and x.shape == y.shape):
            return tfe_carry(prot, x, y, pos)
        pos = 63 if pos is None else pos
        if not 32 <= pos <= 63:  # carries of 33 to 64 bits: one 64-bit tree
            return tfe_carry(prot, x, y, pos)
        shift = 63 - pos  # bit pos moves to bit 63, as TF Encrypted shifts it
        n = int(x.shape.num_elements())
        xs, ys = x.unwrapped, y.unwrapped
        with tf.name_scope("carry"):
            # Each party's two pairwise-PRF streams, as ABY3's zero-sharing draws them
            # (party i: its keys with parties i-1 and i+1, under this call's nonces), one
            # range per AND round, of as many bits per element as the round's width.
            starts = word_ranges(n, [64] + [64 >> j for j in range(CARRY_LEVELS)])
            f = pairwise_streams(prot, starts[-1])  # begin, then the levels
            z, keep = [None] * 3, [None] * 3
            for i in range(3):
                with tf.device(prot.servers[i].device_name):
                    z[i], keep[i] = module.pk_carry_begin(
                        xs[i][0].value, xs[i][1].value, ys[i][0].value, ys[i][1].value,
                        f[i][0], f[i][1], shift=shift, offset=0)
            z, keep = _carry_levels(module, prot, z, keep, f, starts[1:])
            shares = [[None, None], [None, None], [None, None]]
            for i in range(3):
                with tf.device(prot.servers[i].device_name):
                    own, nxt = module.pk_carry_finish(z[i], z[(i + 1) % 3], keep[i])
                    shares[i] = [int8factory.tensor(own, encode=False),
                                 int8factory.tensor(nxt, encode=False)]
            return ABY3PrivateTensor(prot, shares, False, ShareType.BOOLEAN)

    carry._privatekeras_fused = True
    TFE_ORIGINALS["carry_computation"] = tfe_carry
    aby3_mod._carry_computation = carry


def _carry_levels(module, prot, z, keep, f, offsets):
    """The carry circuit's CARRY_LEVELS levels (64 -> 2 bits wide) after its first AND, one
    PkCarryLevel per party per level: party i reads the z of party i + 1 (one message) and
    the masks of level j from word ``offsets[j]`` of its streams ``f[i]``. Returns the last
    level's z and keep."""
    import tensorflow as tf

    for level in range(CARRY_LEVELS):
        k = 64 >> level
        new = [None] * 3
        for i in range(3):
            with tf.device(prot.servers[i].device_name):
                new[i] = module.pk_carry_level(
                    z[i], z[(i + 1) % 3], keep[i], f[i][0], f[i][1], k=k, first=level == 0,
                    offset=offsets[level], Tout=_LEVEL_DTYPE.get(k, "int8"))
        z, keep = [t[0] for t in new], [t[1] for t in new]
    return z, keep


def word_ranges(n, widths):
    """Where consecutive uses of a PRF stream start: one range per entry of ``widths`` (bits
    per element, dividing 64) of ``n`` elements; the last start is the words they all take."""
    starts = [0]
    for bits in widths:
        starts.append(starts[-1] + -(-n * bits // 64))
    return starts


def pairwise_stream(prot, i, side, words):
    """Party ``i``'s pairwise-PRF stream with its previous (``side`` 0) or next (1) party:
    ``words`` int64 words under this call's nonce of that pair, as ABY3's zero-sharing draws
    them, so both parties of the pair read the same words. The caller places it on party
    ``i``'s device and, after all of its draws, advances the nonces once
    (``prot._update_pairwise_nonces()``)."""
    from tf_encrypted.tensor import int64factory

    keys, nonces = prot.pairwise_keys(), prot.pairwise_nonces()
    nonce = nonces[(i + 2) % 3] if side == 0 else nonces[i]
    return int64factory.sample_seeded_uniform([words], seed=keys[i][side] + nonce).value


def pairwise_streams(prot, words):
    """Both pairwise-PRF streams of every party, ``words`` words each, drawn on its device,
    and the nonces advanced: ``[[f0, f1]]`` per party (f0 with the previous party)."""
    import tensorflow as tf

    f = []
    for i in range(3):
        with tf.device(prot.servers[i].device_name):
            f.append([pairwise_stream(prot, i, 0, words), pairwise_stream(prot, i, 1, words)])
    prot._update_pairwise_nonces()
    return f


def secure_randomness_active():
    """True when TFE draws all its randomness from privatekeras' CSPRNG kernels."""
    if import_tfe.cache_info().currsize == 0:
        return False
    from tf_encrypted.operations.secure_random import secure_random as tfe_secure_random
    from ..kernels.loader import SecureRandomModule

    return tfe_secure_random.supports_secure_randomness() and isinstance(
        tfe_secure_random.secure_random_module, SecureRandomModule
    )
