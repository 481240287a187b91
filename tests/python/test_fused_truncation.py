"""The fused truncation (kernels/pk_trunc.cc, mpc/truncation.py): in ABY3 over three parties
(three logical CPUs of one process) it reconstructs to floor(x / 2^16) (or one more, as TF
Encrypted's heuristic truncation does) and to within one of TF Encrypted's own
``prot.truncate``, with consistent replicated shares; its kernels compute the protocol's
formulas, mask every message and read each PRF word for exactly one purpose; they refuse
short streams and mismatched shapes; and a truncation is a few dozen TensorFlow ops, with no
message to P2, where TF Encrypted's is over a hundred."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import aby3_check, child_env

FRAC = 16
LIFT = 62

PROTOCOL = aby3_check('''
import json
from privatekeras.mpc import truncation
F = prot.fixedpoint_config.precision_fractional
assert F == 16, F
edges = [0, 1, -1, 2**16, -2**16, 2**16 - 1, -2**16 + 1, 2**16 + 1, -2**16 - 1, 2**61,
         -2**61, 2**61 - 1, -2**61 + 1, 2**62 - 1, -2**62 + 1, 2**62 - 2**20, -2**62 + 2**20]
small = rng.integers(-2**61, 2**61, size=(6, 50), dtype=np.int64, endpoint=True)
small[0, :len(edges)] = edges
small[1, :50] = rng.integers(-2**20, 2**20, size=50)  # small magnitudes, both signs
big = rng.integers(-2**61, 2**61, size=(2, 9000), dtype=np.int64, endpoint=True)  # sharded
values = (small, big)
meta = []
@tf.function
def run():
    prot.reset()
    out = []
    for v in values:
        X = share(v)
        Y = truncation.truncate(prot, X)
        Z = prot.truncate(X)
        meta.append([Y.is_scaled == X.is_scaled, Y.share_type == ShareType.ARITHMETIC,
                     isinstance(Y, ABY3PrivateTensor), Y.shape == X.shape])
        out.append([[s.value for s in pair] for pair in Y.unwrapped])
        out.append([[s.value for s in pair] for pair in Z.unwrapped])
    return out
def as_np(res):
    return [[[s.numpy() for s in pair] for pair in t] for t in res]
first, second = as_np(run()), as_np(run())
def rec(t):
    with np.errstate(over="ignore"):
        return t[0][0] + t[1][0] + t[2][0]
checks = {"types": all(all(m) for m in meta)}
for k, v in enumerate(values):
    fused, tfe = first[2 * k], first[2 * k + 1]
    want = v >> F  # floor(x / 2^16)
    with np.errstate(over="ignore"):
        d_floor, d_tfe = rec(fused) - want, rec(fused) - rec(tfe)
        d_tfe_floor = rec(tfe) - want
    checks["floor_pm1_%d" % k] = bool((np.abs(d_floor) <= 1).all())
    checks["floor_0_or_1_%d" % k] = bool(np.isin(d_floor, (0, 1)).all())
    checks["tfe_pm1_%d" % k] = bool((np.abs(d_tfe) <= 1).all())
    checks["tfe_itself_0_or_1_%d" % k] = bool(np.isin(d_tfe_floor, (0, 1)).all())
    # replicated: party i's second share is party i+1's first (P2's y0 and y2, drawn on
    # P2, equal P0's and P1's)
    checks["replicated_%d" % k] = all(np.array_equal(fused[i][1], fused[(i + 1) % 3][0])
                                      for i in range(3))
    # fresh randomness each run: the shares change, the value does not (within one)
    again = second[2 * k]
    checks["fresh_%d" % k] = all((fused[i][0] != again[i][0]).mean() > 0.99 for i in range(3))
    with np.errstate(over="ignore"):
        checks["rerun_%d" % k] = bool((np.abs(rec(again) - want - 0.5) <= 0.5).all())
checks["edges"] = [int(a) for a in rec(first[0])[0, :len(edges)]]
checks["edges_want"] = [e >> F for e in edges]
# The graph of one truncation of each kind, counted op by op under its own name scope.
@tf.function
def one():
    prot.reset()
    X = share(small)
    with tf.name_scope("fused"):
        truncation.truncate(prot, X)
    with tf.name_scope("tfe"):
        prot.truncate(X)
    return tf.constant(0)
graph = one.get_concrete_function().graph
def scoped(prefix):
    return [o for o in graph.get_operations() if o.name.startswith(prefix + "/")]
def device_of(op):
    return tf.DeviceSpec.from_string(op.device).device_index
def messages(prefix):
    # tensors made under the scope on one party's device and read on another's (a tensor
    # crosses once per destination, however many ops read it there)
    out = {}
    for op in scoped(prefix):
        for t in op.inputs:
            if t.op.name.startswith(prefix + "/") and device_of(t.op) != device_of(op):
                out[(t.name, device_of(op))] = [device_of(t.op), device_of(op),
                                                t.shape.as_list()]
    return sorted(out.values())
types = {}
for op in scoped("fused"):
    types[op.type] = types.get(op.type, 0) + 1
checks["ops_fused"] = len(scoped("fused"))
checks["ops_tfe"] = len(scoped("tfe"))
checks["compute_ops_fused"] = len([o for o in scoped("fused") if o.type != "Const"])
checks["compute_ops_tfe"] = len([o for o in scoped("tfe") if o.type != "Const"])
checks["op_types_fused"] = types
checks["messages_fused"] = messages("fused")
checks["messages_tfe"] = messages("tfe")
print("RESULT " + json.dumps(checks))
''', seed=5)


@pytest.fixture(scope="module")
def protocol():
    """Run the three-party checks once, in a fresh Python; return their results."""
    out = subprocess.run([sys.executable, "-c", PROTOCOL], env=child_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout + out.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_fused_truncation_matches_floor_and_tf_encrypted(protocol):
    """(a) Random values of both signs up to 2^61 and the edge values: the fused result is
    floor(x / 2^16) or one more, within one of TF Encrypted's, its shares replicated
    consistently (P2's two shares equal P0's and P1's copies), fresh on every run."""
    flags = {k: v for k, v in protocol.items() if isinstance(v, bool)}
    assert flags and all(flags.values()), flags
    got, want = protocol["edges"], protocol["edges_want"]
    assert all(g - w in (0, 1) for g, w in zip(got, want)), (got, want)


def test_fused_truncation_is_a_few_ops_and_sends_nothing_to_p2(protocol):
    """(d) The traced graph of one truncation: far fewer ops than TF Encrypted's, and exactly
    five messages: P2 -> P1 the dealer's [3, ...], P0 -> P1 c0 and t0, P1 -> P0 c1 and t1;
    TF Encrypted's sends to P2 as well."""
    assert protocol["ops_fused"] < 40, protocol["op_types_fused"]
    assert protocol["ops_tfe"] > 80, protocol["ops_tfe"]
    # without the constants (shapes, bounds, nonces): the kernels, the PRF draws, the seeds
    assert protocol["compute_ops_fused"] <= 18, protocol["op_types_fused"]
    assert protocol["messages_fused"] == sorted([
        [2, 1, [3, 6, 50]], [0, 1, [6, 50]], [0, 1, [6, 50]], [1, 0, [6, 50]],
        [1, 0, [6, 50]]])
    assert any(dst == 2 for _, dst, _ in protocol["messages_tfe"]), protocol["messages_tfe"]
    kernels = {k: v for k, v in protocol["op_types_fused"].items() if k.startswith("PkTrunc")}
    assert kernels == {"PkTruncDeal": 1, "PkTruncMask": 1, "PkTruncOpen": 1,
                       "PkTruncReply": 1, "PkTruncFinish": 1}


# ------------------------------------------------------------------------------------------
# Kernel level: the five ops by hand, against the protocol's formulas written out in numpy.


@pytest.fixture(scope="module")
def ops():
    from privatekeras.kernels import ops as load_ops

    return load_ops()


def u(a):
    return np.asarray(a, dtype=np.int64).view(np.uint64)


def i64(a):
    return np.asarray(a, dtype=np.uint64).view(np.int64)


def reference(x0, x1, x2, r, f02, f12, off02, off12, f=FRAC, lift=LIFT):
    """TF Encrypted's lift + secureq8 + unlift, element by element in uint64 (mod 2^64)."""
    n = x0.size
    one = np.uint64(1)
    top = np.uint64(63 - f)
    with np.errstate(over="ignore"):
        r0, s0, m0, y0 = u(f02[off02:off02 + 4 * n]).reshape(4, n)
        y2 = u(f12[off12:off12 + n])
        ru = u(r).ravel()
        msb = ru >> np.uint64(63)
        s = (ru & np.uint64(2**63 - 1)) >> np.uint64(f)
        r1, s1, m1 = ru - r0, s - s0, msb - m0
        c0 = u(x0).ravel() + u(x1).ravel() + np.uint64(1 << lift) + r0
        c1 = u(x2).ravel() + r1
        c = c0 + c1
        cp = (c >> np.uint64(f)) & np.uint64((1 << (63 - f)) - 1)
        high = (c >> np.uint64(63)) == one
        b0 = np.where(high, one - m0, m0)
        b1 = np.where(high, np.uint64(0) - m1, m1)
        yp0 = cp - s0 + (b0 << top)
        yp1 = (b1 << top) - s1
        t0, t1 = yp0 - y0, yp1 - y2
        unlift = np.uint64(1 << (lift - f))
        return {"deal": np.stack([r1, s1, m1]), "unmasked_deal": np.stack([ru, s, msb]),
                "c0": c0, "unmasked_c0": c0 - r0, "c1": c1, "unmasked_c1": u(x2).ravel(),
                "t1": t1, "unmasked_t1": yp1, "t0": t0,
                "unmasked_t0": yp0, "y0": y0 - unlift, "t": t0 + t1, "y2": y2}


def scenario(n, off02=7, off12=3, seed=4):
    rng = np.random.default_rng(seed)
    shape = (n,)
    x = rng.integers(-2**61, 2**61, size=shape, dtype=np.int64)
    x0, x1 = (rng.integers(-2**63, 2**63 - 1, size=shape, dtype=np.int64) for _ in range(2))
    with np.errstate(over="ignore"):
        x2 = x - x0 - x1
    r = rng.integers(-2**63, 2**63 - 1, size=shape, dtype=np.int64)
    # streams longer than the range on both sides
    f02 = rng.integers(-2**63, 2**63 - 1, size=off02 + 4 * n + 5, dtype=np.int64)
    f12 = rng.integers(-2**63, 2**63 - 1, size=off12 + n + 5, dtype=np.int64)
    return dict(x=x, x0=x0, x1=x1, x2=x2, r=r, f02=f02, f12=f12, off02=off02, off12=off12)


def run_kernels(ops, s):
    """The five kernels wired as the protocol wires them (P0's and P2's P0-P2 stream are the
    same words, as are P1's and P2's P1-P2 stream)."""
    deal, y2_on_2, y0_on_2 = ops.pk_trunc_deal(s["r"], s["f12"], s["f02"], amount=FRAC,
                                               lift=LIFT, offset_prev=s["off12"],
                                               offset_next=s["off02"])
    c0 = ops.pk_trunc_mask(s["x0"], s["x1"], s["f02"], lift=LIFT, offset=s["off02"])
    c1 = ops.pk_trunc_open(s["x2"], deal)
    t1, y2_on_1 = ops.pk_trunc_reply(s["x2"], deal, c0, s["f12"], amount=FRAC,
                                     offset=s["off12"])
    t0, y0_on_0 = ops.pk_trunc_finish(c0, c1, s["f02"], amount=FRAC, lift=LIFT,
                                      offset=s["off02"])
    t_on_0 = t_on_1 = t0 + t1  # each of P0 and P1 adds the t it received to its own
    return {"deal": deal, "c0": c0, "c1": c1, "t1": t1, "t0": t0, "y0": (y0_on_0, y0_on_2),
            "t": (t_on_0, t_on_1), "y2": (y2_on_1, y2_on_2)}


@pytest.mark.parametrize("n", [23, 20000])  # 20000: above the threading threshold
def test_kernels_compute_the_protocol_and_mask_every_message(ops, n):
    """(b) Each kernel's outputs are the protocol's formulas, the three shares reconstruct to
    floor(x / 2^16) or one more, and every message (dealer's, c0, c1, t1, t0) differs from
    its unmasked value in every element."""
    s = scenario(n)
    got = run_kernels(ops, s)
    want = reference(s["x0"], s["x1"], s["x2"], s["r"], s["f02"], s["f12"], s["off02"],
                     s["off12"])
    for name in ("deal", "c0", "c1", "t1", "t0"):
        np.testing.assert_array_equal(u(got[name].numpy()).reshape(want[name].shape),
                                      want[name], err_msg=name)
        masked = u(got[name].numpy()).reshape(want[name].shape)
        assert (masked != want["unmasked_" + name]).all(), name
    for name in ("y0", "t", "y2"):  # both holders of each share agree, and match
        a, b = (u(t.numpy()) for t in got[name])
        np.testing.assert_array_equal(a, want[name], err_msg=name)
        np.testing.assert_array_equal(b, want[name], err_msg=name)
    with np.errstate(over="ignore"):
        value = i64(want["y0"] + want["t"] + want["y2"])
    assert np.isin(value - (s["x"] >> FRAC), (0, 1)).all()


def changed_outputs(fn, stream, words):
    """For each word w of `stream`: the (output, element) pairs fn's outputs change at when
    word w is incremented by one."""
    base = [u(t.numpy()).ravel() for t in fn(stream)]
    out = []
    for w in range(words):
        bumped = stream.copy()
        with np.errstate(over="ignore"):
            bumped[w] += 1
        now = [u(t.numpy()).ravel() for t in fn(bumped)]
        out.append(sorted((k, int(e)) for k, (a, b) in enumerate(zip(base, now))
                          for e in np.flatnonzero(a != b)))
    return out


def test_each_prf_word_is_read_for_one_purpose(ops):
    """(b) Word by word: a kernel reads its stream only in [offset, offset + rows * n), and
    each word there moves exactly one output element, so r0, s0, m0, y0 (P0-P2) and y2 (P1-P2)
    come from disjoint words; P0 reads r0 in round 1 and s0, m0, y0 in round 2, the same words
    P2 uses for them."""
    n, off02, off12 = 5, 6, 4
    s = scenario(n, off02, off12, seed=8)
    w02, w12 = s["f02"].size, s["f12"].size
    deal = ops.pk_trunc_deal(s["r"], s["f12"], s["f02"], amount=FRAC, offset_prev=off12,
                             offset_next=off02)[0]
    c0 = ops.pk_trunc_mask(s["x0"], s["x1"], s["f02"], offset=off02)
    c1 = ops.pk_trunc_open(s["x2"], deal)

    # P2, stream with P0: rows r1, s1, m1 of the dealer message (output 0, flattened [3, n])
    # and y0 (output 2).
    moved = changed_outputs(lambda f: ops.pk_trunc_deal(
        s["r"], s["f12"], f, amount=FRAC, offset_prev=off12, offset_next=off02), s["f02"], w02)
    for w, m in enumerate(moved):
        k, e = divmod(w - off02, n)
        if not 0 <= w - off02 < 4 * n:
            assert m == [], (w, m)
        elif k < 3:
            assert m == [(0, k * n + e)], (w, m)
        else:
            assert m == [(2, e)], (w, m)
    # P2, stream with P1: y2 only (output 1).
    moved = changed_outputs(lambda f: ops.pk_trunc_deal(
        s["r"], f, s["f02"], amount=FRAC, offset_prev=off12, offset_next=off02), s["f12"], w12)
    assert moved == [[(1, w - off12)] if 0 <= w - off12 < n else [] for w in range(w12)]
    # P0, round 1: r0 only.
    moved = changed_outputs(lambda f: [ops.pk_trunc_mask(s["x0"], s["x1"], f, offset=off02)],
                            s["f02"], w02)
    assert moved == [[(0, w - off02)] if 0 <= w - off02 < n else [] for w in range(w02)]
    # P0, round 2: s0 and m0 move t0 (output 0); y0 moves its share of y0 (output 1) and
    # t0; r0 is not read again.
    moved = changed_outputs(lambda f: ops.pk_trunc_finish(c0, c1, f, amount=FRAC,
                                                          offset=off02), s["f02"], w02)
    for w, m in enumerate(moved):
        k, e = divmod(w - off02, n)
        if not n <= w - off02 < 4 * n:
            assert m == [], (w, m)
        elif k < 3:
            assert m == [(0, e)], (w, m)
        else:
            assert m == [(0, e), (1, e)], (w, m)
    # P1, round 2: y2 moves t1 (output 0) and its share y2 (output 1).
    moved = changed_outputs(lambda f: ops.pk_trunc_reply(s["x2"], deal, c0, f, amount=FRAC,
                                                         offset=off12), s["f12"], w12)
    assert moved == [[(0, w - off12), (1, w - off12)] if 0 <= w - off12 < n else []
                     for w in range(w12)]


def test_kernels_refuse_short_streams_and_mismatched_shapes(ops):
    """(c) Short PRF streams, a shifted offset past the end, mismatched shapes and bad attrs
    are refused with an InvalidArgumentError that names the problem."""
    import tensorflow as tf

    n = 10
    z = np.zeros(n, np.int64)
    long_ = np.zeros(4 * n, np.int64)
    err = tf.errors.InvalidArgumentError
    with pytest.raises(err, match="PkTruncDeal: the PRF stream f_next must hold at least 40"):
        ops.pk_trunc_deal(z, long_, long_[:-1], amount=FRAC)
    with pytest.raises(err, match="PkTruncDeal: the PRF stream f_prev must hold at least 13"):
        ops.pk_trunc_deal(z, z, long_, amount=FRAC, offset_prev=3)
    with pytest.raises(err, match="PkTruncMask: the PRF stream f_prev must hold at least 11"):
        ops.pk_trunc_mask(z, z, z, offset=1)
    with pytest.raises(err, match="PkTruncMask: x_next must have shape"):
        ops.pk_trunc_mask(z, z[:-1], long_)
    with pytest.raises(err, match="PkTruncReply: the dealer message must have shape"):
        ops.pk_trunc_reply(z, np.zeros((2, n), np.int64), z, z, amount=FRAC)
    with pytest.raises(err, match="PkTruncReply: c0 must have shape"):
        ops.pk_trunc_reply(z, np.zeros((3, n), np.int64), z[:-1], z, amount=FRAC)
    with pytest.raises(err, match="PkTruncReply: the PRF stream f_next must hold at least"):
        ops.pk_trunc_reply(z, np.zeros((3, n), np.int64), z, z[:-1], amount=FRAC)
    with pytest.raises(err, match="PkTruncOpen: the dealer message must have shape"):
        ops.pk_trunc_open(z, np.zeros((2, n), np.int64))
    with pytest.raises(err, match="PkTruncFinish: c1 must have shape"):
        ops.pk_trunc_finish(z, z[:-1], long_, amount=FRAC)
    with pytest.raises(err, match="PkTruncFinish: the PRF stream f_prev must hold at least 40"):
        ops.pk_trunc_finish(z, z, long_[:-1], amount=FRAC)
    with pytest.raises(err, match="amount must be in"):
        ops.pk_trunc_finish(z, z, long_, amount=0)
    with pytest.raises(err, match="lift must be in"):
        ops.pk_trunc_deal(z, z, long_, amount=FRAC, lift=63)
    with pytest.raises(err, match="offset_next must be >= 0"):
        ops.pk_trunc_deal(z, z, long_, amount=FRAC, offset_next=-1)
