"""CKKS parameters with 128-bit security, chosen from what a model needs.

The table is the Homomorphic Encryption Standard's (Albrecht et al., 2018, table of
recommended parameters for 128-bit classical security, uniform ternary secret, error of
standard deviation 3.2): for each ring dimension N, the largest total bit size of the
ciphertext modulus Q (every prime of the chain, the special prime included). Microsoft SEAL,
under TenSEAL, enforces the same table (``CoeffModulus::MaxBitCount``) and refuses anything
beyond it; :func:`check_secure` checks it here too, so a client never generates keys for
parameters that the served model's spec asked for but that are not 128-bit secure.

What the encrypted evaluation does decides the chain. Every model the CKKS backend serves
folds into one affine map ``eta = x W + b`` (depth 1: one product of a ciphertext by plain
weights, no ciphertext-by-ciphertext product, no rotation). The server multiplies without
rescaling, so the result carries scale ``2^(2s)`` and the data primes must hold
``|eta| * 2^(2s)`` with a bit to spare::

    data bits  >= depth_bits = (depth + 1) * s + h + 2
    s          = scale bits: large enough that encryption noise and the rounding of weights
                 and inputs stay below 2^-17 on eta (from N, the weights' L1 norm, the input
                 bound and the bias shift of :mod:`privatekeras.ckks.engine`)
    h          = bits of the largest |eta| (from the weights and the declared input bound)
                 or of the largest shifted input

then a special prime (SEAL's key level: never used by this evaluation, which needs no key
switching), and the smallest N whose table entry holds the total. Depth > 1 is supported by
:func:`choose` for completeness, but no served model has it.
"""

import math

# N -> largest log2(Q) for 128-bit classical security (HE standard; SEAL's tc128 table).
HE_STANDARD_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
NOISE_SIGMA = 3.2  # SEAL's error standard deviation
MAX_PRIME_BITS = 60  # SEAL's largest coefficient-modulus prime
MIN_SPECIAL_BITS = 20
MIN_SCALE_BITS, MAX_SCALE_BITS = 30, 50
TARGET_ERROR_BITS = 17  # aim: |error on eta| <= 2^-17 (about 8e-6; tests allow 1e-3)


def _split(bits):
    """Split ``bits`` into the fewest primes of at most MAX_PRIME_BITS, as even as possible."""
    count = max(1, -(-bits // MAX_PRIME_BITS))
    base, extra = divmod(bits, count)
    return [base + 1] * extra + [base] * (count - extra)


def choose(l1_norm, input_bound, max_bias, n_features, shift=0.0, depth=1):
    """The parameters for a model: ``{"poly_modulus_degree", "coeff_mod_bit_sizes",
    "scale_bits", "depth", "slots", "eta_bound", "security_bits"}``.

    Args:
        l1_norm: the largest L1 norm of a weight column (sum of |w| over the features).
        input_bound: the largest |x| a client may send (the declared input range).
        max_bias: the largest |b|.
        n_features: the number of features d.
        shift: the largest ``|b_k / w0_k|`` (``w0_k`` the largest weight of column ``k``): the
            server adds it to an encrypted column before the product (see
            :mod:`privatekeras.ckks.engine`), so it must fit and keep its precision.
        depth: products of a ciphertext by plain values in sequence (1 for an affine map).
    """
    l1 = max(float(l1_norm), 1.0)
    bound = max(float(input_bound), 1.0)
    eta = l1 * bound + float(max_bias)
    h = max(1, math.ceil(math.log2(max(eta, bound + float(shift)))) + 1)
    for n, max_bits in sorted(HE_STANDARD_128.items()):
        if n < 4096:
            continue  # 54 bits cannot hold two scales of >= 30 bits
        noise = 6 * NOISE_SIGMA * math.sqrt(n) * l1
        s = max(math.ceil(math.log2(noise)) + TARGET_ERROR_BITS + 1,
                math.ceil(math.log2(n_features * bound + float(shift))) + TARGET_ERROR_BITS + 1,
                MIN_SCALE_BITS)
        if s > MAX_SCALE_BITS:
            raise ValueError(
                "the model's weights (largest L1 norm {:.3g}) or its input bound ({:.3g}) are "
                "too large for CKKS at 2^-17 precision: rescale the inputs (declare a "
                "smaller input_range) or regularise the model".format(l1, bound))
        data = _split((depth + 1) * s + h + 2)
        special = min(MAX_PRIME_BITS, max(max(data), MIN_SPECIAL_BITS))
        if sum(data) + special > max_bits:
            special = max_bits - sum(data)
        if special < MIN_SPECIAL_BITS:
            continue
        return {"poly_modulus_degree": n, "coeff_mod_bit_sizes": data + [special],
                "scale_bits": s, "depth": depth, "slots": n // 2, "eta_bound": eta,
                "security_bits": 128}
    raise ValueError("no 128-bit secure CKKS parameters up to N=32768 hold this model "
                     "(|eta| up to {:.3g}): declare a smaller input_range".format(eta))


def check_secure(params):
    """Raise ValueError unless ``params`` (a spec's ``ckks`` entry) are within the HE
    standard's 128-bit table and self-consistent; returns them."""
    try:
        n = int(params["poly_modulus_degree"])
        chain = [int(b) for b in params["coeff_mod_bit_sizes"]]
        s = int(params["scale_bits"])
        depth = int(params.get("depth", 1))
    except (KeyError, TypeError, ValueError):
        raise ValueError("the served model's CKKS parameters are malformed") from None
    if n not in HE_STANDARD_128:
        raise ValueError("CKKS ring dimension N={} is not in the HE standard's table".format(n))
    if len(chain) < 2 or any(not MIN_SPECIAL_BITS <= b <= MAX_PRIME_BITS for b in chain):
        raise ValueError("CKKS modulus chain {} is malformed".format(chain))
    if sum(chain) > HE_STANDARD_128[n]:
        raise ValueError(
            "CKKS parameters N={}, log2 Q={} are below 128-bit security (the HE standard "
            "allows at most {} bits for this N): refused".format(n, sum(chain),
                                                                HE_STANDARD_128[n]))
    if not MIN_SCALE_BITS <= s <= MAX_SCALE_BITS or sum(chain[:-1]) < (depth + 1) * s + 2:
        raise ValueError("CKKS scale 2^{} does not fit the modulus chain {}".format(s, chain))
    return params


def describe(params):
    """One line for prints and logs."""
    return "CKKS N={} modulus {} ({} bits) scale 2^{}, {} slots, 128-bit security".format(
        params["poly_modulus_degree"], "+".join(str(b) for b in params["coeff_mod_bit_sizes"]),
        sum(params["coeff_mod_bit_sizes"]), params["scale_bits"], params["slots"])
