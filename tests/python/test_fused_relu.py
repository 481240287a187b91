"""ReLU on the fused kernels (kernels/pk_fused.cc: PkMsbShare, PkMsbBegin, the carry levels,
PkReluSend, PkReluFinish; mpc/tfe_compat.py: _fused_relu). In ABY3 over three parties (three
logical CPUs of one process) its result reconstructs to exactly ``x * (v > 0)`` -- the same
ring value as TF Encrypted's own ``select(v > 0, 0, x)`` -- for full-range values and edge
cases, on small tensors and on ones large enough for the kernels to split the work across
threads; its shares are a consistent replicated sharing. By hand, the selection's messages
are masked, the OT hides the message not chosen, and the kernels refuse messages or streams
of the wrong size. Structurally, one ReLU is a few dozen ops instead of TF Encrypted's
hundreds."""

import textwrap

import numpy as np
import pytest

from conftest import aby3_check, last_line_per_setting, run_checks

PROTOCOL = aby3_check('''
import collections
from privatekeras.mpc import tfe_compat
assert tfe_compat._fused_kernels_on()
def shares(t):
    return [[t.unwrapped[i][j].value for j in range(2)] for i in range(3)]
ok = []
for shape in [(2, 3, 5), (20011,)]:  # the second: above the kernels' threading threshold
    v, x = rand(*shape), rand(*shape)
    flat = v.reshape(-1)
    flat[:7] = [0, 1, -1, 2**62, -2**62, 2**63 - 1, -2**63 + 1]
    @tf.function
    def run():
        prot.reset()
        V, X = share(v), share(x)
        return [shares(tfe_compat._fused_relu(prot, V, X)),
                shares(prot.select(V > 0, 0, X)),
                shares(tfe_compat.relu(prot, V))]
    fused, tfe, own = [[[s.numpy() for s in pair] for pair in out] for out in run()]
    def value(parts):
        with np.errstate(over="ignore"):
            return parts[0][0] + parts[1][0] + parts[2][0]
    ok.append(np.array_equal(value(fused), np.where(v > 0, x, 0)))
    ok.append(np.array_equal(value(fused), value(tfe)))
    ok.append(np.array_equal(value(own), np.where(v > 0, v, 0)))
    # replicated: party i's second share is party i + 1's first
    ok.append(all(np.array_equal(fused[i][1], fused[(i + 1) % 3][0]) for i in range(3)))
    ok.append(not np.array_equal(fused[0][0], fused[1][0]))  # shares, not copies
    if shape == (2, 3, 5):
        ops = collections.Counter(op.name.split("/")[0]
                                  for op in run.get_concrete_function().graph.get_operations())
        print("ops: fused relu", ops["relu"], "TF Encrypted's select + compare",
              ops["select"] + ops["msb"])
        ok += [ops["relu"] < 80, ops["select"] + ops["msb"] > 300]
print("CHECKS", ok)
print("ALL" if all(ok) else "MISMATCH")
''', seed=5)


def test_fused_relu_is_exact_and_matches_tf_encrypted():
    run_checks(PROTOCOL, timeout=900)


@pytest.fixture(scope="module")
def ops():
    from privatekeras.kernels import ops as load_ops

    return load_ops()


def _selection(ops, x, b, f0, f1, offset=0):
    """The selection's two kernels for three parties, by hand: party i holds shares
    (x_i, x_{i+1}) and (b_i, b_{i+1}), f0[i] / f1[i] its streams with party i - 1 / i + 1.
    The boolean shares come in through the carry's last level and top as PkReluSend takes
    them (z = b, keep = top = 0). Returns each party's sent messages and result shares."""
    n = x[0].size
    zero8 = np.zeros((2, n), np.int8)
    sent = []
    for i in range(3):
        j = (i + 1) % 3
        sent.append([t.numpy() for t in ops.pk_relu_send(
            b[i].astype(np.int8), b[j].astype(np.int8), np.zeros((2, n), np.int64), zero8,
            x[i], x[j], f0[i], f1[i], party=i, offset=offset)])
    out = []
    for i in range(3):
        y = ops.pk_relu_finish(sent[(i + 2) % 3][0], sent[(i + 1) % 3][1], sent[i][2],
                               f0[i], f1[i], party=i, offset=offset)
        out.append([t.numpy() for t in y])
    return sent, out


def _streams(rng, words):
    pair = {k: rng.integers(-2**63, 2**63 - 1, size=words, dtype=np.int64)
            for k in ("01", "12", "20")}
    f0 = [pair["20"], pair["01"], pair["12"]]  # party i with party i - 1
    f1 = [pair["01"], pair["12"], pair["20"]]  # party i with party i + 1
    return f0, f1


def test_selection_kernels_by_hand(ops):
    """x * b from the two kernels for every combination of b's shares; each party's messages
    differ from what they would be with all-zero PRF streams (masked); a receiver's
    unchosen OT message stays masked by a word it never receives; and the streams' words
    from `offset` on are the ones read."""
    rng = np.random.default_rng(11)
    n, offset = 64, 3
    x = [rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64) for _ in range(3)]
    b = [rng.integers(0, 2, size=n, dtype=np.int64) for _ in range(3)]
    f0, f1 = _streams(rng, offset + 6 * n + 1)
    sent, out = _selection(ops, x, b, f0, f1, offset)
    with np.errstate(over="ignore"):
        value = out[0][0] + out[1][0] + out[2][0]
        want = np.where((b[0] ^ b[1] ^ b[2]) == 1, x[0] + x[1] + x[2], 0)
    assert np.array_equal(value, want)
    assert all(np.array_equal(out[i][1], out[(i + 1) % 3][0]) for i in range(3))
    zeros = [np.zeros_like(f) for f in f0]
    bare, _ = _selection(ops, x, b, zeros, zeros, offset)
    for i in range(3):
        for k in (0, 1):
            if sent[i][k].size:
                assert not np.any(sent[i][k] == bare[i][k]), (i, k)
    # Term 0: party 0 sends party 1 [m_0 ^ w_0, m_1 ^ w_1] (w from the stream of parties 0
    # and 2); party 2 sends party 1 w_c, c = b_2. Party 1 never sees w_{1-c}.
    words = f0[0][offset + n:offset + 3 * n].reshape(n, 2)
    helper = sent[2][1][:n]
    assert np.array_equal(helper, words[np.arange(n), b[2]])
    assert not np.any(helper == words[np.arange(n), 1 - b[2]])
    # One word further on, the same streams give the same value in other shares: `offset` is
    # where the kernels read.
    _, shifted = _selection(ops, x, b, f0, f1, offset + 1)
    with np.errstate(over="ignore"):
        assert np.array_equal(shifted[0][0] + shifted[1][0] + shifted[2][0], want)
    assert not np.any(shifted[0][0] == out[0][0])


def test_selection_kernels_refuse_wrong_sizes(ops):
    import tensorflow as tf

    n = 10
    x = np.zeros(n, np.int64)
    z = np.zeros(n, np.int8)
    two = np.zeros((2, n), np.int64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="PRF stream"):
        ops.pk_relu_send(z, z, two, two.astype(np.int8), x, x, np.zeros(6 * n - 1, np.int64),
                         np.zeros(6 * n, np.int64), party=0, offset=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected"):
        ops.pk_relu_finish(np.zeros(3, np.int64), np.zeros(3, np.int64),
                           two.astype(np.int8), np.zeros(6 * n, np.int64),
                           np.zeros(6 * n, np.int64), party=1, offset=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="party"):
        ops.pk_relu_finish(np.zeros(3, np.int64), np.zeros(3, np.int64),
                           two.astype(np.int8), np.zeros(6 * n, np.int64),
                           np.zeros(6 * n, np.int64), party=3, offset=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="party 0 passes"):
        ops.pk_msb_share([], np.zeros(n, np.int64), np.zeros(n, np.int64), party=0,
                         offset=0, shape=[n])


def test_fused_relu_follows_the_fused_carry_switch():
    """With PRIVATEKERAS_FUSED_CARRY=0 ReLU is TF Encrypted's own (for comparisons)."""
    code = textwrap.dedent('''
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
        from privatekeras.mpc.aby3 import ABY3Engine
        from privatekeras.mpc import tfe_compat
        devices = ["/job:localhost/replica:0/task:0/device:CPU:%d" % i for i in range(3)]
        prot = ABY3Engine.in_process(devices).prot
        from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType
        value = [3 << 15, -2 << 16]  # 1.5 and -2.0 at 16 fractional bits
        parts = [[7, -9], [11, 5], [value[0] - 18, value[1] + 4]]
        @tf.function
        def run():
            prot.reset()
            pairs = []
            for i, device in enumerate(devices):
                with tf.device(device):
                    pairs.append([prot.default_factory.tensor(
                        tf.constant(parts[(i + j) % 3], tf.int64), encode=False)
                        for j in range(2)])
            y = tfe_compat.relu(prot, ABY3PrivateTensor(prot, pairs, True, ShareType.ARITHMETIC))
            return sum(y.unwrapped[i][0].value for i in range(3))
        types = {op.type for op in run.get_concrete_function().graph.get_operations()}
        print(tfe_compat._fused_kernels_on(), "PkReluSend" in types,
              (run().numpy() / 2**16).tolist())
    ''')
    last_line_per_setting(code, "PRIVATEKERAS_FUSED_CARRY", {
        "0": "False False [1.5, 0.0]", "1": "True True [1.5, 0.0]"})
