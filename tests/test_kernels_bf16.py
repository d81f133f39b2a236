"""bf16 rounding (nearest, ties to even) against an independent exact-arithmetic oracle."""

import math
import struct
from fractions import Fraction

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from npsparse.kernels import bf16_round, from_bf16, to_bf16


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _bf16_value(bits16: int) -> Fraction:
    """Exact value of a finite bf16 pattern; 0x7F80 (inf) counts as 2**128 for rounding."""
    if bits16 & 0x7FFF == 0x7F80:
        return Fraction(2**128) * (-1 if bits16 & 0x8000 else 1)
    return Fraction(_f32(bits16 << 16))


def oracle(bits32: int) -> int:
    """Round the float32 with these bits to bf16 by comparing exact distances to both neighbours."""
    value = _f32(bits32)
    if math.isnan(value):
        return -1  # any NaN pattern is right; checked separately
    if math.isinf(value):
        return bits32 >> 16
    low = bits32 >> 16  # truncation: same sign, magnitude rounded down
    high = low + 1  # next magnitude (carries into the exponent, or to 0x7F80 = inf)
    exact = Fraction(value)
    d_low = abs(exact - _bf16_value(low))
    d_high = abs(_bf16_value(high) - exact)
    if d_low < d_high or (d_low == d_high and low % 2 == 0):
        return low
    return high


EDGES = [
    0x00000000, 0x80000000,  # +-0
    0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # 1.0, ties to even, near-ties
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # max float -> inf, ties at the top
    0x7F800000, 0xFF800000,  # +-inf
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80008001,  # subnormals and their ties
    0x00800000, 0x0080FFFF,  # smallest normal
]
NANS = [0x7FC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF]


def _round_bits(bits32):
    return to_bf16(np.array(bits32, dtype=np.uint32).view(np.float32))


def test_edge_cases_match_oracle():
    got = _round_bits(EDGES)
    assert got.dtype == np.uint16
    assert [int(g) for g in got] == [oracle(b) for b in EDGES]


def test_nan_stays_nan_with_sign():
    got = _round_bits(NANS)
    back = from_bf16(got)
    assert np.isnan(back).all()
    assert list(np.signbit(back)) == [bool(b >> 31) for b in NANS]


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_random_patterns_match_oracle(patterns):
    got = _round_bits(patterns)
    for bits32, g in zip(patterns, got):
        expected = oracle(bits32)
        if expected == -1:
            assert np.isnan(from_bf16(np.uint16(g)))
        else:
            assert int(g) == expected, hex(bits32)


def test_round_is_idempotent_and_exact_on_bf16_values():
    bits = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16)
    values = from_bf16(bits)
    finite = ~np.isnan(values)
    assert np.array_equal(to_bf16(values)[finite], bits[finite])
    assert np.array_equal(bf16_round(values)[finite], values[finite])
