"""Fixed-point encoding and ABY3 replicated sharing, in numpy alone.

Both the model owner (weights) and clients (inputs, answers) use this module; it needs
neither TensorFlow nor the network. A real value x is encoded as the ring element
round(x * 2^16) of Z_2^64 (int64 arithmetic wraps), and must stay below 2^11 in magnitude.
This is TF Encrypted's ``fixed64_heuristic`` configuration for ABY3, which the workers use.

ABY3 shares a ring element v as v = s0 + s1 + s2 (mod 2^64), with s0 and s1 drawn from the
OS CSPRNG; worker i receives the pair (s_i, s_{i+1}). Any one worker's pair is uniformly
random on its own; any two workers together hold all three shares.
"""

import os

import numpy as np

from ..errors import InputError

WORKERS = 3


def random_ring_elements(shape):
    """Uniform elements of Z_2^64 (as int64) from the OS CSPRNG (getrandom)."""
    n = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(os.urandom(8 * n), dtype=np.int64).reshape(shape).copy()


class FixedPoint:
    """The fixed-point encoding: ``frac_bits`` fractional and ``int_bits`` integral bits."""

    def __init__(self, frac_bits=16, int_bits=11):
        self.frac_bits, self.int_bits = int(frac_bits), int(int_bits)

    @property
    def scale(self):
        """2^frac_bits: one unit of the encoding."""
        return float(2 ** self.frac_bits)

    @property
    def bound(self):
        """Encoded values must lie strictly within (-bound, bound)."""
        return float(2 ** self.int_bits)

    @property
    def headroom(self):
        """Every value of a private evaluation must stay below this in magnitude.

        A product of two encoded values carries 2 * frac_bits fractional bits until it is
        truncated, and ABY3's truncation (TF Encrypted's "heuristic" one) lifts it by 2^62
        and is exact only if the result stays in [0, 2^63): so the real value must lie
        within 2^(62 - 2 * frac_bits) = 2^30 for 16 fractional bits. (Measured: beyond it
        answers go wrong with a probability that depends on the masks, from ~2^32 always.)
        Values between truncations are bounded far more loosely (2^47): this is the binding
        constraint.
        """
        return float(2 ** (62 - 2 * self.frac_bits))

    def describe(self):
        """The public description clients check against the served model's."""
        return {"base": 2, "frac_digits": self.frac_bits, "int_digits": self.int_bits}

    def encode(self, x, what="input"):
        """Encode real values; InputError for NaN/Inf or values out of range."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise InputError("the {} contains NaN or infinite values".format(what))
        big = np.abs(x).max(initial=0.0)
        if big >= self.bound:
            raise InputError(
                "{} values must lie within (-{:g}, {:g}) for the fixed-point encoding "
                "(2^{} integral bits); the largest magnitude here is {:g}. Rescale it (as "
                "the model was trained on it).".format(what, self.bound, self.bound,
                                                       self.int_bits, big))
        return np.round(x * self.scale).astype(np.int64)

    def decode(self, z, frac_bits=None):
        """Real values of encoded ring elements (two's complement); ``frac_bits``: their
        fractional bits when not ``self.frac_bits`` (an untruncated product has twice as many)."""
        scale = self.scale if frac_bits is None else float(2 ** int(frac_bits))
        return np.asarray(z, dtype=np.int64).astype(np.float64) / scale


FIXED64 = FixedPoint(16, 11)


def share(v):
    """Split ring elements ``v`` into ABY3 replicated shares: a list, per worker, of its pair
    ``(s_i, s_{i+1})``."""
    v = np.asarray(v, dtype=np.int64)
    s0 = random_ring_elements(v.shape)
    s1 = random_ring_elements(v.shape)
    with np.errstate(over="ignore"):
        s2 = v - s0 - s1  # wraps mod 2^64
    s = (s0, s1, s2)
    return [(s[i], s[(i + 1) % WORKERS]) for i in range(WORKERS)]


def reconstruct(per_worker):
    """The ring elements behind each worker's share pair, after checking that the replicas
    agree (worker i's second share is worker i+1's first)."""
    for i in range(WORKERS):
        j = (i + 1) % WORKERS
        if not np.array_equal(per_worker[i][1], per_worker[j][0]):
            raise RuntimeError(
                "the workers' shares of the answer are inconsistent (worker {} and worker {} "
                "hold different copies of the same share): a worker is faulty".format(i, j))
    with np.errstate(over="ignore"):
        return per_worker[0][0] + per_worker[1][0] + per_worker[2][0]


def share_values(x, encoding=FIXED64, what="input"):
    """Encode real values and share them (see :func:`share`)."""
    return share(encoding.encode(x, what=what))


def reconstruct_values(per_worker, encoding=FIXED64, frac_bits=None):
    """Reconstruct and decode (see :func:`reconstruct` and :meth:`FixedPoint.decode`)."""
    return encoding.decode(reconstruct(per_worker), frac_bits)
