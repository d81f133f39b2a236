"""The 16-row panel bitmask format: structure first, then values, then products (every expand
lowering, any thread count) against the naive loop and the dense product, then stored arrays."""

import numba
import numpy as np
import pytest
from helpers import products_on_one_and_two_threads, rebuilt_from_read_only_views
from hypothesis import given, settings
from hypothesis import strategies as st

import npsparse.kernels as nk
from npsparse.errors import NpsparseError
from npsparse.kernels import _panel_simd, panel

CEILING = numba.config.NUMBA_NUM_THREADS


def random_problem(seed, n_rows, k_cols, density):
    """(W [N, K] float32, keep [N, K] bool); density "2:4" keeps the 2 largest of every 4."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
    if density == "2:4":
        groups = np.abs(weight).reshape(n_rows, k_cols // 4, 4)
        rank = np.argsort(np.argsort(groups, axis=2, kind="stable"), axis=2)
        return weight, (rank >= 2).reshape(n_rows, k_cols)
    return weight, rng.random((n_rows, k_cols)) < density


@st.composite
def problems(draw):
    """((W, keep), T, seed): rows not a multiple of 16, odd K, K = 1, N = 1, every density."""
    density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3, 0.5, 0.9, "2:4"]))
    n_rows = draw(st.one_of(st.integers(1, 70), st.sampled_from([1, 16, 32, 48])))
    if density == "2:4":
        k_cols = 4 * draw(st.integers(1, 40))
    else:
        k_cols = draw(st.one_of(st.integers(1, 130), st.sampled_from([1, 2, 3, 64, 257])))
    seed = draw(st.integers(0, 2**32 - 1))
    n_tokens = draw(st.sampled_from([1, 1, 2, 3, 8, 17]))
    return random_problem(seed, n_rows, k_cols, density), n_tokens, seed


def assert_product(layer, x, dense):
    """Fast kernel == naive loop == x @ dense.T, to float32 summation-order accuracy."""
    bound = np.abs(x) @ np.abs(dense).T  # [T, N]
    tol = 2e-6 * bound + 1e-30
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    fast, naive = layer(x), layer.matmul_naive(x)
    assert fast.shape == naive.shape == expected.shape
    assert fast.dtype == naive.dtype == np.float32 and fast.flags.c_contiguous
    assert np.all(np.abs(fast - expected) <= tol)
    assert np.all(np.abs(naive - expected) <= tol)


# ---- structure -----------------------------------------------------------------------------------

@given(data=problems())
def test_structure(data):
    (weight, keep), _, _ = data
    layer = nk.pack(weight, keep, "panel")
    a = layer.arrays
    n_rows, k_cols = keep.shape
    panels, pairs = -(-n_rows // 16), -(-k_cols // 2)
    assert a["masks"].dtype == np.uint32 and a["masks"].shape == (panels, pairs)
    assert a["values"].dtype == np.uint16 and a["values"].shape == (keep.sum(),)
    assert a["panel_ptr"].dtype == np.int64 and a["panel_ptr"].shape == (panels + 1,)
    assert a["panel_ptr"][0] == 0 and layer.nnz == keep.sum()
    assert np.array_equal(np.diff(a["panel_ptr"]), [keep[16 * q:16 * q + 16].sum()
                                                    for q in range(panels)])
    assert np.array_equal(layer.keep_mask(), keep)
    assert layer.nbytes == panel.panel_nbytes(n_rows, k_cols, int(keep.sum()))
    # bit r of word (q, j) is (row 16q + r, column 2j); bit 16 + r is column 2j + 1
    q, j, r = n_rows // 2 // 16, (k_cols - 1) // 2, n_rows // 2 % 16
    word = int(a["masks"][q, j])
    assert (word >> r) & 1 == keep[16 * q + r, 2 * j]
    if 2 * j + 1 < k_cols:
        assert (word >> (16 + r)) & 1 == keep[16 * q + r, 2 * j + 1]
    else:  # odd K: the padding column's bits are clear
        assert not np.any(a["masks"][:, -1] >> np.uint32(16))


def test_values_follow_the_bit_order():
    weight = np.arange(1, 17 * 3 + 1, dtype=np.float32).reshape(17, 3)  # small ints: exact bf16
    layer = nk.pack(weight, None, "panel")
    values = nk.from_bf16(layer.arrays["values"])
    # panel 0: pair 0 = column 0 rows 0..15, then column 1 rows 0..15; pair 1 = column 2 only
    assert np.array_equal(values[:16], weight[:16, 0])
    assert np.array_equal(values[16:32], weight[:16, 1])
    assert np.array_equal(values[32:48], weight[:16, 2])
    assert np.array_equal(values[48:], weight[16])  # panel 1: row 16's columns 0, 1, 2
    assert list(layer.arrays["panel_ptr"]) == [0, 48, 51]


# ---- values and products -------------------------------------------------------------------------

@given(data=problems())
def test_round_trip(data):
    (weight, keep), _, _ = data
    layer = nk.pack(weight, keep, "panel")
    assert np.array_equal(layer.to_dense(), nk.bf16_round(np.where(keep, weight, np.float32(0))))


@given(data=problems())
def test_kernel_matches_naive_and_dense(data):
    (weight, keep), n_tokens, seed = data
    layer = nk.pack(weight, keep, "panel")
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, weight.shape[1]))
    assert_product(layer, x.astype(np.float32), layer.to_dense())


@settings(max_examples=25)
@given(data=problems())
def test_exact_on_integers(data):
    """Small integers: every partial sum is exact in float32, so all three agree to the bit."""
    (weight, keep), n_tokens, seed = data
    rng = np.random.default_rng(seed)
    weight = rng.integers(-8, 9, size=weight.shape).astype(np.float32)
    layer = nk.pack(weight, keep, "panel")
    x = rng.integers(-8, 9, size=(n_tokens, weight.shape[1])).astype(np.float32)
    dense = layer.to_dense()
    assert np.array_equal(layer(x), x @ dense.T)
    assert np.array_equal(layer.matmul_naive(x), x @ dense.T)


def test_edge_cases():
    rng = np.random.default_rng(0)
    for n_rows, k_cols in [(1, 1), (1, 2), (16, 1), (17, 3), (33, 64), (5, 1000)]:
        weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
        for keep in (np.zeros_like(weight, bool), np.ones_like(weight, bool)):
            layer = nk.pack(weight, keep, "panel")
            for n_tokens in (1, 4):
                x = rng.standard_normal((n_tokens, k_cols)).astype(np.float32)
                assert_product(layer, x, layer.to_dense())
    layer = nk.pack(np.eye(4, dtype=np.float32), None, "panel")
    assert np.array_equal(layer(np.arange(4, dtype=np.float32)), [[0, 1, 2, 3]])


@pytest.mark.parametrize("density", [0.3, 1.0, "2:4"])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_portable_path_gives_the_same_bits(density, n_tokens):
    """Forcing the exact-read lowering everywhere (what non-AVX-512 hosts run) changes no bit:
    both sum in the same order. Big enough that most panels take the host's lowering."""
    weight, keep = random_problem(1, 100, 516, density)
    layer = nk.pack(weight, keep, "panel")
    x = np.random.default_rng(2).standard_normal((n_tokens, 516)).astype(np.float32)
    fast = layer(x)
    layer._portable = True
    try:
        portable = layer(x)
    finally:
        layer._portable = False
    np.testing.assert_array_equal(fast, portable)
    assert_product(layer, x, layer.to_dense())


def _one_panel_kernel(dot, dot4):
    @numba.njit
    def one_panel(masks, values, x, out):  # x [5, K]: tokens 0-3 by dot4, token 4 by dot
        dot4(masks, 0, values, 0, x, 0, x.shape[1], masks.shape[0], out, 0, 16)
        dot(masks, 0, values, 0, x, 4 * x.shape[1], 0, masks.shape[0], out, 64, 0)

    return one_panel


@pytest.mark.parametrize("mode", _panel_simd.MODES)
def test_every_lowering_computes_one_panel(mode):
    """Each lowering the host can run (all three on an AVX-512 VBMI2 CPU) against the naive loop."""
    if mode == "vbmi2" and _panel_simd.HOST_MODE != "vbmi2":
        pytest.skip("needs AVX-512 VBMI2")
    if mode == "avx512" and _panel_simd.HOST_MODE == "portable":
        pytest.skip("needs AVX-512")
    weight, keep = random_problem(3, 16, 90, 0.4)
    layer = nk.pack(weight, keep, "panel")
    a = layer.arrays
    values = np.concatenate([a["values"], np.zeros(_panel_simd.OVERREAD, np.uint16)])
    x = np.random.default_rng(4).standard_normal((5, 90)).astype(np.float32)
    out = np.full((5, 16), np.nan, np.float32)
    one_panel = _one_panel_kernel(_panel_simd.PANEL_DOT[mode], _panel_simd.PANEL_DOT4[mode])
    one_panel(a["masks"][0], values, x, out)
    np.testing.assert_allclose(out, layer.matmul_naive(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CEILING < 2, reason="needs NUMBA_NUM_THREADS >= 2")
@settings(max_examples=10)
@given(n_rows=st.sampled_from([16, 200, 1100]), n_tokens=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_same_bits_with_one_thread_and_two(n_rows, n_tokens, seed):
    weight, keep = random_problem(seed, n_rows, 130, 0.5)
    layer = nk.pack(weight, keep, "panel")
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, 130)).astype(np.float32)
    one, two = products_on_one_and_two_threads(layer, x)
    np.testing.assert_array_equal(one, two)


# ---- stored arrays and errors --------------------------------------------------------------------

def test_to_from_arrays_without_copy_and_read_only():
    weight, keep = random_problem(7, 37, 75, 0.5)
    layer = nk.pack(weight, keep, "panel")
    arrays, meta = nk.to_arrays(layer)
    assert meta == {"format": "panel", "shape": "37,75", "schema": "1", "values": "bf16"}
    rebuilt = rebuilt_from_read_only_views(layer)
    assert type(rebuilt) is nk.PanelLinear and rebuilt.shape == (37, 75)
    assert np.array_equal(rebuilt.to_dense(), layer.to_dense())
    x = np.random.default_rng(8).standard_normal((3, 75)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(x), layer(x))


def test_panel_bytes_estimate_is_exact():
    for rows, cols in ((37, 75), (16, 64), (1, 1)):
        weight, keep = random_problem(9, rows, cols, 0.3)
        sizes = nk.packed_nbytes(weight, keep, "panel")
        assert nk.pack(weight, keep, "panel").nbytes == sizes[("panel", "")]


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(NpsparseError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_errors():
    weight, keep = random_problem(10, 20, 9, 0.5)
    _raises("panel values", nk.pack, weight, keep, "panel", values="int8")
    arrays, meta = nk.to_arrays(nk.pack(weight, keep, "panel"))
    _raises("'masks' must be 2-D uint32", nk.from_arrays,
            {**arrays, "masks": arrays["masks"].astype(np.int64)}, meta)
    _raises("needs array 'panel_ptr'", nk.from_arrays,
            {k: v for k, v in arrays.items() if k != "panel_ptr"}, meta)
    _raises("'masks' has shape", nk.from_arrays, arrays, {**meta, "shape": "40,9"})
    padding_row = arrays["masks"].copy()
    padding_row[1, 0] |= np.uint32(1 << 7)  # row 16 + 7 = 23 of a 20-row weight
    _raises("bits set past row 20", nk.from_arrays, {**arrays, "masks": padding_row}, meta)
    padding_col = arrays["masks"].copy()
    padding_col[0, 4] |= np.uint32(1 << 16)  # column 9 of a 9-column weight
    _raises("bits set past", nk.from_arrays, {**arrays, "masks": padding_col}, meta)
    moved = arrays["panel_ptr"].copy()
    moved[1] += 1
    _raises("does not match", nk.from_arrays, {**arrays, "panel_ptr": moved}, meta)
    short = arrays["panel_ptr"].copy()
    short[-1] -= 1
    _raises("'panel_ptr' must rise", nk.from_arrays, {**arrays, "panel_ptr": short}, meta)
