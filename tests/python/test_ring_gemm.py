"""The ring kernels (kernels/pk_ring.cc): matrix products and convolutions over Z/2^64,
bit-exact against numpy's int64 arithmetic (which wraps) on random full-range inputs of
awkward shapes, on every code path this CPU has (AVX-512, AVX2, portable), forced through the
op's ``isa`` attribute and through $PRIVATEKERAS_RING_ISA; and, in ABY3 over three parties
(three logical CPUs of one process), the private products that use them against TF
Encrypted's own functions. The served model's answers are checked by test_e2e.py and
test_privacy.py."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import aby3_check, child_env, last_line_per_setting, run_checks

ISAS = ("generic", "avx2", "avx512")
MATMUL_SHAPES = [(1, 1, 1), (1, 576, 10), (3, 5, 7), (6, 16, 16), (7, 300, 17), (13, 1, 257),
                 (97, 513, 33), (200, 9, 16), (5, 700, 3)]
# (n, h, w, c, kh, kw, out channels, strides, padding)
CONV_SHAPES = [(2, 5, 6, 3, 3, 3, 4, (1, 1), "SAME"), (1, 28, 28, 1, 3, 3, 16, (1, 1), "SAME"),
               (3, 7, 9, 5, 2, 3, 7, (2, 1), "VALID"), (2, 8, 8, 4, 4, 4, 20, (3, 2), "SAME"),
               (1, 4, 4, 2, 5, 5, 3, (1, 1), "SAME"), (2, 14, 14, 16, 3, 3, 32, (1, 1), "SAME"),
               (1, 6, 5, 3, 1, 1, 2, (1, 1), "VALID")]


@pytest.fixture(scope="module")
def ops():
    from privatekeras.kernels import ops as load_ops

    return load_ops()


def cpu_has(isa):
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    return {"generic": True, "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags and "avx512dq" in flags}[isa]


def rand(rng, *shape):
    info = np.iinfo(np.int64)
    return rng.integers(info.min, info.max, size=shape, dtype=np.int64, endpoint=True)


def conv_reference(x, f, strides, padding):
    """conv2d of NHWC int64 images, wrapping, as tf.nn.conv2d would compute it."""
    n, h, w, c = x.shape
    kh, kw = f.shape[:2]
    if padding == "SAME":
        pads = []
        for size, win, st in ((h, kh, strides[0]), (w, kw, strides[1])):
            out = -(-size // st)
            total = max((out - 1) * st + win - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    win = win[:, ::strides[0], ::strides[1]]  # n, oh, ow, c, kh, kw
    with np.errstate(over="ignore"):
        return np.einsum("nhwcij,ijco->nhwo", win, f)


@pytest.mark.parametrize("isa", ISAS)
def test_matmul_bit_exact(ops, isa):
    if not cpu_has(isa):
        pytest.skip("this CPU has no " + isa)
    rng = np.random.default_rng(11)
    with np.errstate(over="ignore"):
        for m, k, n in MATMUL_SHAPES:
            a, b = rand(rng, m, k), rand(rng, k, n)
            got = ops.pk_ring_mat_mul([a], [b], isa=isa).numpy()
            assert np.array_equal(got, a @ b), (isa, m, k, n)
            # a sum of products is one product with the inner dimension concatenated
            a2, b2 = rand(rng, m, 3), rand(rng, 3, n)
            got = ops.pk_ring_mat_mul([a, a2], [b, b2], isa=isa).numpy()
            assert np.array_equal(got, a @ b + a2 @ b2), (isa, m, k, n)


def test_matmul_edge_values(ops):
    """Products that overflow in every way: all-ones, the extremes, powers of two."""
    info = np.iinfo(np.int64)
    vals = np.array([0, 1, -1, info.min, info.max, 1 << 32, (1 << 32) - 1, -(1 << 32),
                     0x5555555555555555, -0x5555555555555556], dtype=np.int64)
    a = np.resize(vals, (7, 10))
    b = np.resize(vals[::-1], (10, 19))
    with np.errstate(over="ignore"):
        want = a @ b
    for isa in ISAS:
        if cpu_has(isa):
            assert np.array_equal(ops.pk_ring_mat_mul([a], [b], isa=isa).numpy(), want), isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_conv2d_bit_exact(ops, isa, fmt):
    if not cpu_has(isa):
        pytest.skip("this CPU has no " + isa)
    rng = np.random.default_rng(12)
    layout = (lambda v: np.transpose(v, (0, 3, 1, 2))) if fmt == "NCHW" else (lambda v: v)
    for n, h, w, c, kh, kw, o, strides, padding in CONV_SHAPES:
        x, f = rand(rng, n, h, w, c), rand(rng, kh, kw, c, o)
        x2, f2 = rand(rng, n, h, w, 2), rand(rng, kh, kw, 2, o)
        want = conv_reference(x, f, strides, padding)
        got = ops.pk_ring_conv2d([layout(x)], [f], strides=list(strides), padding=padding,
                                 data_format=fmt, isa=isa).numpy()
        assert np.array_equal(got, layout(want)), (isa, fmt, n, h, w, c, kh, kw, o)
        with np.errstate(over="ignore"):
            want2 = want + conv_reference(x2, f2, strides, padding)
        got2 = ops.pk_ring_conv2d([layout(x), layout(x2)], [f, f2], strides=list(strides),
                                  padding=padding, data_format=fmt, isa=isa).numpy()
        assert np.array_equal(got2, layout(want2)), (isa, fmt, n, h, w, c, kh, kw, o)


def test_conv2d_matches_tensorflow_shapes(ops):
    """Output shapes agree with tf.nn.conv2d (the same SAME/VALID arithmetic)."""
    import tensorflow as tf

    rng = np.random.default_rng(13)
    for n, h, w, c, kh, kw, o, strides, padding in CONV_SHAPES:
        x, f = rand(rng, n, h, w, c) % 7, rand(rng, kh, kw, c, o) % 7
        ref = tf.nn.conv2d(x.astype(np.float64), f.astype(np.float64), [1, *strides, 1],
                           padding).numpy()
        got = ops.pk_ring_conv2d([x], [f], strides=list(strides), padding=padding).numpy()
        assert got.shape == ref.shape
        assert np.array_equal(got, ref.astype(np.int64))  # small values: exact in float64


def test_bad_arguments(ops):
    import tensorflow as tf

    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        ops.pk_ring_mat_mul([np.zeros((2, 3), np.int64)], [np.zeros((4, 5), np.int64)])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="isa"):
        ops.pk_ring_mat_mul([np.zeros((2, 3), np.int64)], [np.zeros((3, 5), np.int64)],
                            isa="sse9")


@pytest.mark.parametrize("isa", ISAS)
def test_environment_variable_forces_a_path(isa):
    """$PRIVATEKERAS_RING_ISA picks the code path of kernels made with isa='auto' (and one
    the CPU lacks is refused with a clear error)."""
    code = textwrap.dedent("""
        import numpy as np
        from privatekeras.kernels import ops
        rng = np.random.default_rng(5)
        a = rng.integers(-2**63, 2**63 - 1, size=(37, 301), dtype=np.int64)
        b = rng.integers(-2**63, 2**63 - 1, size=(301, 29), dtype=np.int64)
        with np.errstate(over="ignore"):
            ok = np.array_equal(ops().pk_ring_mat_mul([a], [b]).numpy(), a @ b)
        print("EXACT" if ok else "WRONG")
    """)
    env = dict(child_env(), PRIVATEKERAS_RING_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    if cpu_has(isa):
        assert out.returncode == 0 and "EXACT" in out.stdout, out.stderr[-2000:]
    else:
        assert out.returncode != 0 and "does not support isa" in out.stderr


# In ABY3 (three logical CPUs): private x private products without a scale, so nothing is
# truncated and the revealed values are exact ring products whatever the masks. Each is
# computed by our functions and by TF Encrypted's originals in the same graph, and checked
# against numpy.
PROTOCOL = aby3_check(textwrap.dedent("""
    from privatekeras.mpc.tfe_compat import TFE_ORIGINALS
    assert getattr(aby3_mod._conv2d_private_private, "_privatekeras_ring", False)

    def reveal(t):
        with np.errstate(over="ignore"):
            return sum(t.unwrapped[i][0].value.numpy() for i in range(3))

    x, w = rand(2, 3, 9, 8), rand(3, 3, 3, 5)           # NCHW images, [kh, kw, C, O]
    a, b = rand(4, 33), rand(33, 6)

    @tf.function
    def run():
        prot.reset()
        X, W, A, B = (share(v, scaled=False) for v in (x, w, a, b))
        out = [aby3_mod._conv2d_private_private(prot, X, W, (1, 2), "SAME"),
               TFE_ORIGINALS["conv2d_private_private"](prot, X, W, (1, 2), "SAME"),
               aby3_mod._matmul_private_private(prot, A, B),
               TFE_ORIGINALS["matmul_private_private"](prot, A, B)]
        return [[t.unwrapped[i][0].value for i in range(3)] for t in out]

    with np.errstate(over="ignore"):
        res = [sum(v.numpy() for v in parts) for parts in run()]
        xh = np.transpose(x, (0, 2, 3, 1))
        pads = ((0, 0), (1, 1), (0, 1), (0, 0))  # SAME, 3x3, stride (1, 2) on 9x8
        xp = np.pad(xh, pads)
        win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))[:, ::1, ::2]
        conv = np.transpose(np.einsum("nhwcij,ijco->nhwo", win, w), (0, 3, 1, 2))
        mm = a @ b
    checks = [np.array_equal(res[0], res[1]), np.array_equal(res[0], conv),
              np.array_equal(res[2], mm), np.array_equal(res[3], mm)]
    print("CHECKS", checks)
    print("ALL" if all(checks) else "MISMATCH")
"""), seed=7)


def test_private_products_match_tf_encrypted():
    run_checks(PROTOCOL, timeout=600)


def test_ring_kernels_can_be_turned_off():
    """PRIVATEKERAS_RING_KERNELS=0 leaves TF Encrypted's own products in place (the
    comparison the benchmark and the test above rely on)."""
    code = ("from privatekeras.mpc.tfe_compat import import_tfe\nimport_tfe()\n"
            "from tf_encrypted.protocol.aby3 import aby3\n"
            "print(getattr(aby3._conv2d_private_private, '_privatekeras_ring', False))\n")
    last_line_per_setting(code, "PRIVATEKERAS_RING_KERNELS", {"0": "False", "1": "True"})


def test_im2col_matches_tf_encrypted():
    """The factory's im2col (TF Encrypted's layout: rows (c, dy, dx), columns (oy, ox, n)),
    through PkRingIm2Col, equals TF Encrypted's own on random full-range shares."""
    import tensorflow as tf
    from privatekeras.mpc.tfe_compat import TFE_ORIGINALS, import_tfe

    import_tfe()
    from tf_encrypted.tensor import int64factory

    rng = np.random.default_rng(14)
    for n, c, h, w, kh, kw, strides, padding in [
            (2, 3, 6, 5, 2, 2, (2, 2), "VALID"), (1, 16, 28, 28, 2, 2, (2, 2), "VALID"),
            (3, 2, 7, 7, 3, 3, (1, 1), "SAME"), (2, 4, 9, 8, 3, 2, (2, 3), "SAME"),
            (4, 16, 14, 14, 2, 2, (2, 2), "VALID")]:
        x = int64factory.tensor(tf.constant(rand(rng, n, c, h, w)), encode=False)
        ours = x.im2col(kh, kw, strides, padding).value.numpy()
        theirs = TFE_ORIGINALS["im2col"](x, kh, kw, strides, padding).value.numpy()
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
