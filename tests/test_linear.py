"""DenseLinear: the Numba GEMV (one token) and the BLAS product (several) equal x @ W.T."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from npsparse.linear import DenseLinear


@given(n=st.integers(1, 300), k=st.integers(1, 200), tokens=st.integers(1, 3),
       readonly=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_dense_linear_equals_matmul(n, k, tokens, readonly, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    if readonly:  # memory-mapped checkpoints are read-only
        weight.setflags(write=False)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    got = DenseLinear(weight)(x)
    assert got.shape == (tokens, n) and got.dtype == np.float32
    expected = x.astype(np.float64) @ weight.T.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))
