"""The fused carry circuit (kernels/pk_fused.cc, mpc/tfe_compat.py): in ABY3 over three
parties (three logical CPUs of one process) the carry bits it computes equal TF Encrypted's
own circuit and the carries of Python integers, for every position the fused path takes, and
ReLU built on it is exact; each level's message is masked with its share of a zero-sharing
read from its own, non-overlapping bits of the pairwise-PRF streams."""


import numpy as np
import pytest

from conftest import aby3_check, last_line_per_setting, run_checks

PROTOCOL = aby3_check('''
from privatekeras.mpc.tfe_compat import TFE_ORIGINALS
assert getattr(aby3_mod._carry_computation, "_privatekeras_fused", False)
shape = (3, 5, 7)
x, y = rand(*shape), rand(*shape)
x[0, 0, :4] = [-1, 0, -1, 2**62]; y[0, 0, :4] = [1, 0, -1, 2**62]
v = rand(*shape); v[0, 0, :5] = [0, 1, -1, 2**63 - 1, -2**63 + 1]
@tf.function
def run():
    prot.reset()
    X, Y = share(x, ShareType.BOOLEAN, False), share(y, ShareType.BOOLEAN, False)
    outs = []
    for pos in (63, 62, 40, 32):
        outs.append(aby3_mod._carry_computation(prot, X, Y, pos))
        outs.append(TFE_ORIGINALS["carry_computation"](prot, X, Y, pos))
    V = share(v, ShareType.ARITHMETIC, False)
    outs.append(prot.relu(V))
    return [[o.unwrapped[i][0].value for i in range(3)] for o in outs]
res = run()
def rec_bool(parts): return np.bitwise_xor.reduce([p.numpy().astype(np.int64) for p in parts])
ok = []
for j, pos in enumerate((63, 62, 40, 32)):
    a, b = rec_bool(res[2 * j]), rec_bool(res[2 * j + 1])
    ux, uy = x.astype(np.uint64), y.astype(np.uint64)
    m = np.uint64((1 << (pos + 1)) - 1) if pos < 63 else np.uint64(2**64 - 1)
    lx, ly = ux & m, uy & m
    # carry out of bit pos of lx + ly: as python ints
    want = np.array([(int(p) + int(q)) >> (pos + 1) & 1
                     for p, q in zip(lx.ravel(), ly.ravel())]).reshape(shape)
    ok += [np.array_equal(a, b), np.array_equal(a, want)]
with np.errstate(over="ignore"):
    relu = sum(p.numpy() for p in res[-1])
ok.append(np.array_equal(relu, np.where(v > 0, v, 0)))
print("CHECKS", ok)
print("ALL" if all(ok) else "MISMATCH")
''', seed=3)


@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_fused_carry_matches_tf_encrypted_and_integers(isa):
    """Both ways of compacting bits in the levels (BMI2 where the CPU has it, "generic": the
    portable one) give TF Encrypted's carries."""
    run_checks(PROTOCOL, timeout=900, PRIVATEKERAS_RING_ISA=isa)


@pytest.fixture(scope="module")
def ops():
    from privatekeras.kernels import ops as load_ops

    return load_ops()


def even_bits(v):
    """Bits 0, 2, 4, ... of each uint64, packed (reference for the kernel's split)."""
    out = np.zeros_like(v)
    for j in range(32):
        out |= ((v >> np.uint64(2 * j)) & np.uint64(1)) << np.uint64(j)
    return out


def test_level_kernel_masks_and_layout(ops):
    """One level by hand: split G and P of width k, the two ANDs of this party's shares,
    packed [G-AND | P-AND], xor k bits of f0 ^ f1 per element from word `offset` on."""
    import tensorflow as tf

    rng = np.random.default_rng(9)
    n, k, offset = 37, 16, 5
    h = k // 2
    mk = np.uint64((1 << k) - 1)
    z_own = rng.integers(0, 1 << (2 * k), size=n, dtype=np.int64).astype(np.int32)
    z_next = rng.integers(0, 1 << (2 * k), size=n, dtype=np.int64).astype(np.int32)
    keep = rng.integers(0, 1 << k, size=(2, n), dtype=np.int64)
    words = offset + -(-n * k // 64) + 3
    f0 = rng.integers(-2**63, 2**63 - 1, size=words, dtype=np.int64)
    f1 = rng.integers(-2**63, 2**63 - 1, size=words, dtype=np.int64)
    z, keep_out = ops.pk_carry_level(z_own, z_next, keep, f0, f1, k=k, first=False,
                                     offset=offset, Tout=tf.int16)
    u = lambda a: a.astype(np.int64).astype(np.uint64) & np.uint64(2**32 - 1)  # noqa: E731
    a, b = u(z_own), u(z_next)
    g0 = keep[0].astype(np.uint64) ^ (a & mk)
    g1 = keep[1].astype(np.uint64) ^ (b & mk)
    p0, p1 = (a >> np.uint64(k)) & mk, (b >> np.uint64(k)) & mk
    ge0, ge1, go0, go1 = even_bits(g0), even_bits(g1), even_bits(g0 >> np.uint64(1)), \
        even_bits(g1 >> np.uint64(1))
    pe0, pe1, po0, po1 = even_bits(p0), even_bits(p1), even_bits(p0 >> np.uint64(1)), \
        even_bits(p1 >> np.uint64(1))
    and_g = (ge0 & po0) ^ (ge0 & po1) ^ (ge1 & po0)
    and_p = (pe0 & po0) ^ (pe0 & po1) ^ (pe1 & po0)
    stream = (f0 ^ f1).astype(np.uint64)
    bit = np.arange(n, dtype=np.uint64) * np.uint64(k)
    mask = (stream[offset + (bit >> np.uint64(6)).astype(np.int64)] >> (bit & np.uint64(63))) & mk
    want = ((and_g | (and_p << np.uint64(h))) ^ mask) & mk
    got = z.numpy().astype(np.int64).astype(np.uint64) & mk
    assert np.array_equal(got, want)
    assert np.array_equal(keep_out.numpy().astype(np.uint64), np.stack([go0, go1]))
    assert not np.array_equal(got, (and_g | (and_p << np.uint64(h))) & mk)  # masked


def test_level_kernel_refuses_short_streams(ops):
    import tensorflow as tf

    z = np.zeros(100, np.int64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="PRF stream"):
        ops.pk_carry_level(z, z, np.zeros((2, 100), np.int64), np.zeros(99, np.int64),
                           np.zeros(99, np.int64), k=64, first=True, offset=0, Tout=tf.int64)


def test_fused_carry_can_be_turned_off():
    code = ("from privatekeras.mpc.tfe_compat import import_tfe\nimport_tfe()\n"
            "from tf_encrypted.protocol.aby3 import aby3\n"
            "print(getattr(aby3._carry_computation, '_privatekeras_fused', False))\n")
    last_line_per_setting(code, "PRIVATEKERAS_FUSED_CARRY", {"0": "False", "1": "True"})
