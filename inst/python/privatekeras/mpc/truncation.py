"""ABY3's truncation of a product, on fused kernels (``kernels/pk_trunc.cc``).

TF Encrypted 0.9.1 truncates a private fixed-point value ``x`` (after a product of two scaled
tensors) with its heuristic method: lift ``x`` by 2^62 in the ring (so its top bit is 0 when
|x| < 2^62), run the SecureQ8-style three-party truncation of a value with a zero top bit,
and subtract 2^(62 - f) (f = ``precision_fractional``, 16) from the result. Written in
TensorFlow ops that costs ~117 ops. :func:`truncate` runs the same protocol, with the same
randomness sources and the same result distribution, as one kernel per party per round.

The parties, with replicated shares x = x_0 + x_1 + x_2 (party i holds x_i, x_{i+1}):

- Draws. P0 and P2 expand their pairwise PRF (the key P0 shares with P2, under this call's
  nonce) into 4n words: r0, s0, m0, y0 (rows of n words, as TFE's ``[4] + shape`` draw). P1
  and P2 expand theirs into n words: y2. P2 draws its private r from the CSPRNG
  (``int64factory.sample_uniform``, the ChaCha20 kernel under a fresh key).
- Round 0. P2 (``PkTruncDeal``): s = (r mod 2^63) >> f, r_msb = r >> 63, and sends P1 one
  tensor [3, ...] = (r1 = r - r0, s1 = s - s0, m1 = r_msb - m0). It depends on no input, so
  it is on its way as the step starts.
- Round 1. P0 (``PkTruncMask``) sends P1 c0 = x_0 + x_1 + 2^62 + r0; P1 (``PkTruncOpen``)
  sends P0 c1 = x_2 + r1. Both know c = c0 + c1 = x + 2^62 + r.
- Round 2. P1 (``PkTruncReply``): its share of the truncation y'1 = -s1 + b1 * 2^(63-f)
  (b1 = c_msb ? -m1 : m1), sends P0 t1 = y'1 - y2. P0 (``PkTruncFinish``):
  y'0 = ((c mod 2^63) >> f) - s0 + b0 * 2^(63-f) (b0 = c_msb ? 1 - m0 : m0), sends P1
  t0 = y'0 - y0. Each adds the t it received to its own: P0's shares are
  (y0 - 2^(62-f), t0 + t1), P1's (t0 + t1, y2), P2's (y2, y0 - 2^(62-f)) from its own
  draws: nothing is sent to P2.

Two rounds, as TF Encrypted's. Messages: P2 -> P1 24 bytes per element, P0 -> P1 16 (c0,
t0), P1 -> P0 16 (c1, t1), none between P2 and P0. Each is masked by words its receiver does
not know: r0, s0, m0 and y0 (P0-P2 PRF) hide the dealer message, c0 and t0 from P1;
r1 = r - r0 (P2's private r) hides c1 and y2 (P1-P2 PRF) hides t1 from P0. P0 and P1 learn
c = x + 2^62 + r, masked by r. TFE sends the same messages, except that it also transfers
y0 (P0 -> P2) and y2 (P1 -> P2), which P2 can draw itself.

The result (y0 - 2^(62-f)) + (t0 + t1) + y2 is floor(x / 2^f) or one more, like TFE's.
"""

from ..kernels import loader

LIFT = 62  # TFE's heuristic bound: nbits - 2 for the 64-bit ring
LOW_ROWS = 4  # r0, s0, m0, y0: the P0-P2 stream's words per element
HIGH_ROWS = 1  # y2: the P1-P2 stream's words per element


def truncate(prot, x):
    """``x`` (a private ABY3 tensor, arithmetic, int64 shares) truncated by
    ``prot.fixedpoint_config.precision_fractional`` bits, as TF Encrypted's heuristic
    ``prot.truncate(x)``: the same ring lift (precondition |x| < 2^62) and the same protocol,
    on the fused kernels (see the module docstring). Anything else goes to
    ``prot.truncate``."""
    from .tfe_compat import fusable, import_tfe, pairwise_stream

    import_tfe()
    amount = int(prot.fixedpoint_config.precision_fractional)
    if not (fusable(x) and x.shape.num_elements() > 0 and 1 <= amount <= LIFT):
        return prot.truncate(x)
    import tensorflow as tf
    from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType
    from tf_encrypted.tensor import int64factory

    ops = loader.load()
    n = int(x.shape.num_elements())
    xs = x.unwrapped
    device = [prot.servers[i].device_name for i in range(3)]
    with tf.name_scope("truncate-fused"):
        with tf.device(device[0]):
            f02_on_0 = pairwise_stream(prot, 0, 0, LOW_ROWS * n)  # with P2
        with tf.device(device[1]):
            f12_on_1 = pairwise_stream(prot, 1, 1, HIGH_ROWS * n)  # with P2
        with tf.device(device[2]):
            f12_on_2 = pairwise_stream(prot, 2, 0, HIGH_ROWS * n)  # with P1
            f02_on_2 = pairwise_stream(prot, 2, 1, LOW_ROWS * n)  # with P0
            r = int64factory.sample_uniform(x.shape).value  # P2's private randomness
        prot._update_pairwise_nonces()

        # Round 0: the dealer's message to P1 (it depends on no input).
        with tf.device(device[2]):
            deal, y2_on_2, y0_on_2 = ops.pk_trunc_deal(
                r, f12_on_2, f02_on_2, amount=amount, lift=LIFT, offset_prev=0, offset_next=0)
        # Round 1: P0 and P1 exchange their masked shares of x', c0 and c1.
        with tf.device(device[0]):
            c0 = ops.pk_trunc_mask(xs[0][0].value, xs[0][1].value, f02_on_0, lift=LIFT,
                                   offset=0)
        with tf.device(device[1]):
            c1 = ops.pk_trunc_open(xs[1][1].value, deal)
        # Round 2: they exchange their masked shares of the result, t0 and t1.
        with tf.device(device[1]):
            t1, y2_on_1 = ops.pk_trunc_reply(xs[1][1].value, deal, c0, f12_on_1,
                                             amount=amount, offset=0)
        with tf.device(device[0]):
            t0, y0_on_0 = ops.pk_trunc_finish(c0, c1, f02_on_0, amount=amount, lift=LIFT,
                                              offset=0)
            t_on_0 = t0 + t1
        with tf.device(device[1]):
            t_on_1 = t1 + t0

        def wrap(v):
            return int64factory.tensor(v, encode=False)

        shares = [[wrap(y0_on_0), wrap(t_on_0)],
                  [wrap(t_on_1), wrap(y2_on_1)],
                  [wrap(y2_on_2), wrap(y0_on_2)]]
        return ABY3PrivateTensor(prot, shares, x.is_scaled, ShareType.ARITHMETIC)
