"""The secure kernels: ChaCha20 against RFC 8439, the seeded sampler's key derivation
(recomputed here in Python), uniform sampling, ABY3's bit ops, and the refusal to run without
them. The raw keystream op comes from the separate test library pk_test_ops.so."""

import hashlib
import os
import struct
import subprocess
import sys
import unittest

import numpy as np
import pytest

from conftest import child_env


# tfe_compat lives in privatekeras.mpc (formerly at the package's top level); for children.
IMPORT_TFE = ("try:\n    from privatekeras.mpc.tfe_compat import import_tfe\n"
              "except ImportError:\n    from privatekeras.tfe_compat import import_tfe\n")


def import_tfe():
    try:
        from privatekeras.mpc.tfe_compat import import_tfe as imp
    except ImportError:
        from privatekeras.tfe_compat import import_tfe as imp
    return imp()


@pytest.fixture(scope="module")
def ops():
    from privatekeras.kernels import ops as load_ops

    import_tfe()
    return load_ops()


@pytest.fixture(scope="module")
def test_ops(ops):
    """The test-only op library (PkChacha20Keystream), which production code never loads."""
    import tensorflow as tf
    from privatekeras.kernels.build import test_library_path as ops_test_library_path

    return tf.load_op_library(ops_test_library_path())


def keystream(test_ops, key, nonce, counter, blocks):
    out = test_ops.pk_chacha20_keystream(np.frombuffer(key, np.uint8),
                                         np.frombuffer(nonce, np.uint8), np.int64(counter),
                                         np.int64(blocks))
    return bytes(out.numpy())


# PkSeededRandomUniform's KDF, written out independently of pk_ops.cc: keyed BLAKE2b-256,
# key = the 8 int32 seed values little-endian, message = domain || 0x00 || len(dtype name) ||
# dtype name || minval || maxval (both int64 little-endian).
KDF_DOMAIN = b"privatekeras/chacha20-prf/v1"


def derived_key(seed, dtype, minval, maxval):
    name = np.dtype(dtype).name.encode()
    use = KDF_DOMAIN + b"\x00" + bytes([len(name)]) + name + struct.pack("<qq", minval, maxval)
    return hashlib.blake2b(use, digest_size=32,
                           key=np.asarray(seed, dtype="<i4").tobytes()).digest()


def expected_draws(words, dtype, minval, maxval):
    """FillUniform for a range 2^k (nothing is rejected): minval + (word mod 2^k)."""
    bits = np.iinfo(dtype).bits
    range_ = maxval - minval
    assert range_ & (range_ - 1) == 0, "only power-of-two ranges cannot reject"
    out = []
    for w in words:
        v = (minval + int(w) % range_) % (1 << bits)
        out.append(v - (1 << bits) if v >= 1 << (bits - 1) else v)
    return np.array(out, dtype=dtype)


def stream_words(test_ops, key, dtype, n):
    """The first n sampling words of the keystream under key: 64-bit words for int64,
    32-bit words for smaller types, little-endian."""
    word = np.dtype("<u8") if np.dtype(dtype).itemsize == 8 else np.dtype("<u4")
    blocks = -(-n * word.itemsize // 64)
    return np.frombuffer(keystream(test_ops, key, bytes(12), 0, blocks), dtype=word)[:n]


# RFC 8439, Appendix A.1 (test vectors #1 and #2) and section 2.3.2.
RFC_BLOCKS = [
    (bytes(32), bytes(12), 0,
     "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
     "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"),
    (bytes(32), bytes(12), 1,
     "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
     "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"),
    (bytes(range(32)), bytes.fromhex("000000090000004a00000000"), 1,
     "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
     "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"),
]


@pytest.mark.parametrize("key,nonce,counter,expected", RFC_BLOCKS)
def test_chacha20_block_matches_rfc8439(test_ops, key, nonce, counter, expected):
    assert keystream(test_ops, key, nonce, counter, 1).hex() == expected


def test_chacha20_encryption_matches_rfc8439_section_2_4_2(test_ops):
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
                 b"for the future, sunscreen would be it.")
    stream = keystream(test_ops, bytes(range(32)), bytes.fromhex("000000000000004a00000000"), 1,
                       2)
    cipher = bytes(a ^ b for a, b in zip(plaintext, stream))
    assert cipher.hex() == (
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d")


def test_production_library_has_no_raw_keystream_op(ops):
    """PkChacha20Keystream (keystream under a caller-chosen key) is only in pk_test_ops.so."""
    import tensorflow as tf
    from privatekeras.kernels.build import default_library_path
    from privatekeras.kernels.build import test_library_path as ops_test_library_path

    assert not hasattr(ops, "pk_chacha20_keystream")
    assert not hasattr(tf.load_op_library(default_library_path()), "pk_chacha20_keystream")
    with open(default_library_path(), "rb") as f:
        assert b"PkChacha20Keystream" not in f.read()
    assert os.path.dirname(ops_test_library_path()) == os.path.dirname(default_library_path())


SEED = np.array([7, -3, 11, 0, 1, 2, 99, -100], dtype=np.int32)

# (dtype, minval, maxval) with a range 2^k, so that rejection sampling cannot reject.
POWER_OF_TWO_RANGES = [
    (np.int64, -(1 << 62), 1 << 62),
    (np.int64, 0, 1 << 40),
    (np.int32, -(1 << 30), 1 << 30),
    (np.int32, 0, 1 << 16),
    (np.int16, -(1 << 14), 1 << 14),
    (np.int8, -64, 64),
]


@pytest.mark.parametrize("dtype,minval,maxval", POWER_OF_TWO_RANGES)
def test_seeded_sampler_is_chacha20_under_the_derived_key(ops, test_ops, dtype, minval, maxval):
    """Recompute PkSeededRandomUniform in Python: BLAKE2b key derivation, then the ChaCha20
    keystream (all-zero nonce, counter from 0) mapped by FillUniform."""
    n = 40
    key = derived_key(SEED, dtype, minval, maxval)
    drawn = ops.pk_seeded_random_uniform([n], SEED, dtype(minval), dtype(maxval)).numpy()
    assert drawn.dtype == dtype
    np.testing.assert_array_equal(
        drawn, expected_draws(stream_words(test_ops, key, dtype, n), dtype, minval, maxval))


def test_seeded_sampler_over_the_full_int64_range(ops, test_ops):
    """Range 2^64 - 1 rejects only the word 2^64 - 1: the draws are the keystream words under
    the derived key, offset by minval."""
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    words = stream_words(test_ops, derived_key(SEED, np.int64, lo, hi), np.int64, 32)
    assert (words != np.uint64(2**64 - 1)).all()
    drawn = ops.pk_seeded_random_uniform([32], SEED, np.int64(lo), np.int64(hi)).numpy()
    np.testing.assert_array_equal(drawn, (words + np.uint64(1 << 63)).view(np.int64))


def test_derived_key_stream_matches_an_independent_chacha20(test_ops):
    """The keystream the expectation above is built from agrees with the `cryptography`
    package's ChaCha20 (nonce = 32-bit little-endian counter || 96-bit nonce), when it is
    installed."""
    algorithms = pytest.importorskip("cryptography.hazmat.primitives.ciphers.algorithms")
    from cryptography.hazmat.primitives.ciphers import Cipher

    key = derived_key(SEED, np.int64, 0, 1 << 40)
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    assert enc.update(bytes(256)) == keystream(test_ops, key, bytes(12), 0, 4)


@pytest.mark.parametrize("dtype,minval,maxval", POWER_OF_TWO_RANGES)
def test_seeded_sampler_does_not_use_the_seed_as_the_key(ops, test_ops, dtype, minval, maxval):
    """The seed itself (e.g. ABY3's pairwise key + nonce) is never the ChaCha20 key: the draws
    differ from what the raw-seed keystream would give."""
    n = 64
    raw = expected_draws(stream_words(test_ops, SEED.astype("<i4").tobytes(), dtype, n), dtype,
                         minval, maxval)
    drawn = ops.pk_seeded_random_uniform([n], SEED, dtype(minval), dtype(maxval)).numpy()
    assert (drawn != raw).mean() > 0.5, (drawn, raw)


def test_each_dtype_and_range_gets_its_own_stream(ops):
    """One seed, different uses: unrelated streams (with the seed as the key, [0, 2^32) and
    [0, 2^33) would share their low 32 bits, and int32/int64 would share keystream bytes);
    the same use again: the same stream, as two ABY3 parties sharing a seed need."""
    n = 256
    a = ops.pk_seeded_random_uniform([n], SEED, np.int64(0), np.int64(1 << 32)).numpy()
    b = ops.pk_seeded_random_uniform([n], SEED, np.int64(0), np.int64(1 << 33)).numpy()
    c = ops.pk_seeded_random_uniform([n], SEED, np.int64(-(1 << 31)), np.int64(1 << 31)).numpy()
    d = ops.pk_seeded_random_uniform([n], SEED, np.int32(0), np.int32(1 << 30)).numpy()
    low = np.int64((1 << 32) - 1)
    assert (a != (b & low)).mean() > 0.9
    assert (a != c + (1 << 31)).mean() > 0.9
    assert (a & ((1 << 30) - 1) != d).mean() > 0.9
    again = ops.pk_seeded_random_uniform([n], SEED.copy(), np.int64(0), np.int64(1 << 32))
    np.testing.assert_array_equal(a, again.numpy())
    # A larger shape extends the stream of a smaller one (the shape is not part of the key).
    longer = ops.pk_seeded_random_uniform([2 * n], SEED, np.int64(0), np.int64(1 << 32)).numpy()
    np.testing.assert_array_equal(longer[:n], a)


def test_seeded_sampling_is_deterministic_uniform_and_in_range(ops):
    seed = np.array([7, -3, 11, 0, 1, 2, 99, -100], dtype=np.int32)
    a = ops.pk_seeded_random_uniform([60000], seed, np.int32(-5), np.int32(7)).numpy()
    b = ops.pk_seeded_random_uniform([60000], seed, np.int32(-5), np.int32(7)).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.min() == -5 and a.max() == 6
    counts = np.bincount(a + 5, minlength=12)
    expected = 60000 / 12
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40, counts  # 11 degrees of freedom: p < 1e-4 beyond 35
    for dtype in (np.int8, np.int16, np.int64):
        v = ops.pk_seeded_random_uniform([1000], seed, dtype(-3), dtype(3)).numpy()
        assert v.dtype == dtype and v.min() >= -3 and v.max() < 3


def test_fresh_seeds_differ_and_bad_arguments_are_refused(ops):
    import tensorflow as tf

    seeds = {tuple(ops.pk_secure_seed().numpy()) for _ in range(20)}
    assert len(seeds) == 20
    a = ops.pk_random_uniform([64], np.int64(0), np.int64(1 << 40)).numpy()
    b = ops.pk_random_uniform([64], np.int64(0), np.int64(1 << 40)).numpy()
    assert not np.array_equal(a, b)
    with pytest.raises(tf.errors.InvalidArgumentError, match="seed must hold 8"):
        ops.pk_seeded_random_uniform([3], np.array([1], np.int32), np.int32(0), np.int32(9))
    with pytest.raises(tf.errors.InvalidArgumentError, match="minval < maxval"):
        ops.pk_seeded_random_uniform([3], np.zeros(8, np.int32), np.int32(5), np.int32(5))


def test_tfe_uses_our_secure_randomness(ops):
    import privatekeras as pk
    from tf_encrypted.operations import secure_random

    assert secure_random.supports_secure_randomness()
    assert pk.secure_randomness_active()


def test_tfe_own_aux_tests_pass_on_our_kernels(ops):
    """Run TF Encrypted's own aux-op tests (shipped in the wheel) against our kernels."""
    from tf_encrypted.operations.aux import aux_test

    suite = unittest.defaultTestLoader.loadTestsFromModule(aux_test)
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    assert result.testsRun == 3 and not result.skipped
    assert result.wasSuccessful(), result.failures + result.errors


def test_bit_reverse_and_xor_indices_match_numpy(ops):
    import tensorflow as tf
    from tf_encrypted.operations import aux

    rng = np.random.default_rng(5)
    x = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=200, dtype=np.int64)
    bits = ((x[:, None].view(np.uint64) >> np.arange(64, dtype=np.uint64)) & np.uint64(1))
    rev = (bits[:, ::-1] << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    np.testing.assert_array_equal(aux.bit_reverse(tf.constant(x)).numpy(), rev.view(np.int64))
    idx = np.bitwise_xor.reduce(bits.astype(np.int64) * np.arange(64), axis=1)
    np.testing.assert_array_equal(aux.xor_indices(tf.constant(x)).numpy(), idx)
    small = tf.constant(np.array([0b1010, -1], dtype=np.int16))
    np.testing.assert_array_equal(aux.bit_gather(small, 1, 2).numpy(), [0b11, 0xFF])


def test_refuses_to_start_without_kernels(tmp_path):
    code = (IMPORT_TFE +
            "try:\n    import_tfe()\nexcept Exception as e:\n"
            "    print(type(e).__name__); print(e)\n")
    env = child_env()
    env["PRIVATEKERAS_KERNELS"] = str(tmp_path / "nowhere")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert out.startswith("KernelsMissingError"), out
    assert "refuses to start" in out and "python -m privatekeras.kernels build" in out
    assert "insecure randomness" in out


def test_worker_refuses_to_start_without_kernels(tmp_path):
    import privatekeras as pk
    from conftest import free_hosts

    env_before = os.environ.get("PRIVATEKERAS_KERNELS")
    cluster = pk.Cluster(free_hosts(), start_timeout=60)
    try:
        # The loopback interposer is found first (in the real directory); the workers then
        # look for their kernels in an empty one.
        from privatekeras.kernels.build import library_dir
        import shutil

        shutil.copy(os.path.join(library_dir(), "pk_loopback.so"), tmp_path / "pk_loopback.so")
        os.environ["PRIVATEKERAS_KERNELS"] = str(tmp_path)
        with pytest.raises(pk.ClusterError, match="refuses to start"):
            cluster.start()
    finally:
        if env_before is None:
            os.environ.pop("PRIVATEKERAS_KERNELS", None)
        else:
            os.environ["PRIVATEKERAS_KERNELS"] = env_before
        cluster.stop()
