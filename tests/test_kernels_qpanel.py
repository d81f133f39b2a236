"""The qpanel format (int8 weights x int8 activations): structure, quantization per row and group
of columns against a NumPy restatement, products (each lowering, any thread count) against the
naive loop and the dense product, exact integer cases, stacking, then stored arrays and errors."""

from types import SimpleNamespace

import numba
import numpy as np
import pytest
from helpers import products_on_one_and_two_threads, rebuilt_from_read_only_views
from hypothesis import given, settings
from hypothesis import strategies as st

import npsparse.kernels as nk
from npsparse.arena import consolidate
from npsparse.errors import NpsparseError
from npsparse.kernels import _qpanel_simd, qpanel

CEILING = numba.config.NUMBA_NUM_THREADS
GROUPS = [32, 64, 96, 128, 4096]  # columns per weight scale; 4096: one scale per row here


def random_problem(seed, n_rows, k_cols, density):
    """(W [N, K] float32, keep [N, K] bool); density "2:4" keeps the 2 largest of every 4."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
    if density == "2:4":
        groups = np.abs(weight).reshape(n_rows, k_cols // 4, 4)
        rank = np.argsort(np.argsort(groups, axis=2, kind="stable"), axis=2)
        return weight, (rank >= 2).reshape(n_rows, k_cols)
    return weight, rng.random((n_rows, k_cols)) < density


def one_group(layers):
    """A model of one block whose layers a, b, ... form one fusable group (as test_arena)."""
    names = tuple("abcdefgh"[:len(layers)])
    block = SimpleNamespace(linears=dict(zip(names, layers)), fusable_groups=(names,))
    return SimpleNamespace(blocks=[block]), block, names


@st.composite
def problems(draw):
    """((W, keep), T, seed, group): N not a multiple of 16, K not a multiple of 32, K < 32, N = 1,
    groups that do not divide K32 and one longer than K32."""
    density = draw(st.sampled_from([0.0, 1.0, 0.3, 0.05, 0.7, "2:4"]))
    n_rows = draw(st.one_of(st.integers(1, 70), st.sampled_from([1, 16, 32, 48])))
    if density == "2:4":
        k_cols = 4 * draw(st.integers(1, 40))
    else:
        k_cols = draw(st.one_of(st.integers(1, 140), st.sampled_from([1, 31, 32, 33, 64, 257])))
    seed = draw(st.integers(0, 2**32 - 1))
    n_tokens = draw(st.integers(1, 6))
    group = draw(st.sampled_from(GROUPS))
    return random_problem(seed, n_rows, k_cols, density), n_tokens, seed, group


def round_half_away(v):
    """C roundf on float32 values, restated: sign * floor(|v| + 1/2), in float64."""
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_groups_reference(weight, keep, group):
    """(W*mask) per row and group of columns through int8 and back: the weights the layer must
    hold."""
    kept = np.where(keep, weight, np.float32(0)).astype(np.float32)
    out = np.zeros_like(kept)
    for n in range(kept.shape[0]):
        for lo in range(0, kept.shape[1], group):
            part = kept[n, lo:lo + group]
            scale = np.float32(np.abs(part).max() / np.float32(127))
            if scale > 0:
                out[n, lo:lo + group] = round_half_away(part / scale).astype(np.float32) * scale
    return out


def quantize_x_reference(x):
    """ggml's quantize_row_q8_0_ref per 32 columns (zero-padded): (x_q, d, sx)."""
    n_tokens, k_cols = x.shape
    k32 = -(-k_cols // 32) * 32
    padded = np.zeros((n_tokens, k32), np.float32)
    padded[:, :k_cols] = x
    blocks = padded.reshape(n_tokens, k32 // 32, 32)
    d = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)  # [T, B]
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    x_q = round_half_away((blocks * inv[:, :, None]).astype(np.float32)).astype(np.int8)
    return x_q.reshape(n_tokens, k32), d, x_q.astype(np.int32).sum(axis=2)


def quantization_bound(x, dense):
    """|x @ W.T - x_deq @ W.T| per output: each x_k moves by at most d_b / 2 (plus a rounding)."""
    n_tokens, k_cols = x.shape
    _, d, _ = quantize_x_reference(x)
    step = np.repeat(d, 32, axis=1)[:, :k_cols].astype(np.float64)  # [T, K] d_b of each column
    return (0.5 * step + 1e-6 * np.abs(x)) @ np.abs(dense.T).astype(np.float64)


def run_portable(layer, x):
    layer._portable = True
    try:
        return layer(x)
    finally:
        layer._portable = False


# ---- structure -----------------------------------------------------------------------------------

@given(data=problems())
def test_structure(data):
    (weight, keep), _, _, group = data
    layer = nk.pack(weight, keep, "qpanel", group=group)
    a = layer.arrays
    n_rows, k_cols = keep.shape
    panels, quads = -(-n_rows // 16), -(-k_cols // 32) * 8
    groups = -(-4 * quads // group)
    assert a["masks"].dtype == np.uint64 and a["masks"].shape == (panels, quads)
    assert a["values"].dtype == np.uint8 and a["values"].shape == (keep.sum(),)
    assert a["panel_ptr"].dtype == np.int64 and a["panel_ptr"].shape == (panels + 1,)
    assert a["scales"].dtype == np.float32 and a["scales"].shape == (panels, groups, 16)
    assert a["scales"].flags.c_contiguous
    by_row = a["scales"].transpose(0, 2, 1).reshape(16 * panels, groups)  # [16 P, G]
    assert np.all(by_row[n_rows:] == 0)
    np.testing.assert_array_equal(layer.row_scales(), by_row[:n_rows])
    assert a["panel_ptr"][0] == 0 and layer.nnz == keep.sum()
    assert np.array_equal(np.diff(a["panel_ptr"]), [keep[16 * q:16 * q + 16].sum()
                                                    for q in range(panels)])
    assert np.all(a["values"] >= 1)  # w_q + 128 with w_q in -127..127
    assert np.array_equal(layer.keep_mask(), keep)
    assert layer.nbytes == qpanel.qpanel_nbytes(n_rows, k_cols, int(keep.sum()), group)
    # bit 4r + c of word (q, j) is (row 16q + r, column 4j + c)
    q, r, col = n_rows // 2 // 16, n_rows // 2 % 16, k_cols - 1
    assert (int(a["masks"][q, col // 4]) >> (4 * r + col % 4)) & 1 == keep[16 * q + r, col]
    padded = qpanel.unpack_qpanel_bits(a["masks"], (16 * panels, 4 * quads))
    assert not padded[n_rows:].any() and not padded[:, k_cols:].any()  # padding bits clear


def test_values_follow_the_bit_order():
    weight = np.tile(np.arange(1, 6, dtype=np.float32), (17, 1)) * 127 / 5  # rows scale 1
    layer = nk.pack(weight, None, "qpanel")
    v = layer.arrays["values"].astype(int) - 128
    # panel 0, quad 0: row 0 columns 0-3, row 1 columns 0-3, ...; quad 1: column 4 of rows 0-15
    assert list(v[:8]) == [25, 51, 76, 102, 25, 51, 76, 102]
    assert np.array_equal(v[64:80], [127] * 16)
    assert list(v[80:]) == [25, 51, 76, 102, 127]  # panel 1: row 16
    assert list(layer.arrays["panel_ptr"]) == [0, 80, 85]


# ---- quantization --------------------------------------------------------------------------------

@given(data=problems())
def test_to_dense_is_the_group_quantization(data):
    (weight, keep), _, _, group = data
    layer = nk.pack(weight, keep, "qpanel", group=group)
    np.testing.assert_array_equal(layer.to_dense(), quantize_groups_reference(weight, keep, group))
    kept = np.where(keep, weight, np.float32(0))
    for g, lo in enumerate(range(0, weight.shape[1], group)):  # s = max|w| / 127 exactly
        amax = np.abs(kept[:, lo:lo + group]).max(axis=1)
        np.testing.assert_array_equal(layer.row_scales()[:, g],
                                      (amax / np.float32(127)).astype(np.float32))


def test_an_outlier_coarsens_only_its_group():
    """One large weight in columns 32-63: with groups of 32 the other groups keep a fine grid,
    with one scale per row every small weight rounds to 0."""
    weight = np.full((3, 96), 0.01, np.float32)
    weight[:, 40] = 100.0
    grouped = nk.pack(weight, None, "qpanel", group=32).to_dense()
    per_row = nk.pack(weight, None, "qpanel", group=96).to_dense()
    np.testing.assert_allclose(grouped[:, :32], 0.01, rtol=1e-6)
    np.testing.assert_allclose(grouped[:, 64:], 0.01, rtol=1e-6)
    np.testing.assert_allclose(grouped[:, 40], 100.0, rtol=1e-6)
    np.testing.assert_array_equal(per_row[:, 40], grouped[:, 40])
    assert np.count_nonzero(per_row) == 3  # 0.01 < 100 / 127 / 2: rounds to 0


def test_a_group_of_the_whole_row_is_one_scale_per_row():
    """Any group >= K32 stores the same arrays: one scale per row."""
    weight, keep = random_problem(2, 20, 70, 0.5)  # K32 = 96
    layers = [nk.pack(weight, keep, "qpanel", group=g) for g in (96, 128, 2**20)]
    for layer in layers:
        assert layer.arrays["scales"].shape == (2, 1, 16)
        for name, a in layer.arrays.items():
            np.testing.assert_array_equal(a, layers[0].arrays[name])
    kept = np.where(keep, weight, np.float32(0))
    np.testing.assert_array_equal(layers[0].row_scales()[:, 0],
                                  (np.abs(kept).max(axis=1) / np.float32(127)).astype(np.float32))
    x = np.random.default_rng(3).standard_normal((5, 70)).astype(np.float32)
    np.testing.assert_array_equal(layers[2](x), layers[0](x))


def test_weight_halves_round_away_from_zero():
    weight = np.array([[127, 2.5, 0.5, -0.5, -2.5, 126.5, -1.5]], np.float32)  # scale 1
    layer = nk.pack(weight, None, "qpanel")
    np.testing.assert_array_equal(layer.to_dense(), [[127, 3, 1, -1, -3, 127, -2]])


def test_rows_that_keep_only_zeros():
    weight = np.zeros((20, 40), np.float32)
    weight[3, 5] = 2.0
    keep = np.ones_like(weight, bool)
    layer = nk.pack(weight, keep, "qpanel")
    a = layer.arrays
    assert np.count_nonzero(a["scales"]) == 1 and layer.row_scales()[3, 0] == np.float32(2 / 127)
    assert np.count_nonzero(a["values"] != 128) == 1
    x = np.ones((2, 40), np.float32)
    np.testing.assert_array_equal(layer(x), layer.matmul_naive(x))
    assert np.array_equal(np.nonzero(layer(x))[1], [3, 3])


@settings(max_examples=50)
@given(n_tokens=st.integers(1, 4), k_cols=st.integers(1, 100), seed=st.integers(0, 2**32 - 1),
       zero_block=st.booleans())
def test_quantize_activations(n_tokens, k_cols, seed, zero_block):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tokens, k_cols)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    if zero_block:
        x[:, :32] = 0
    x_q, d, sx = qpanel.quantize_activations(x)
    want = quantize_x_reference(x)
    assert x_q.dtype == np.int8 and d.dtype == np.float32 and sx.dtype == np.int32
    for got, expected in zip((x_q, d, sx), want):
        np.testing.assert_array_equal(got, expected)
    assert np.all(np.abs(x_q) <= 127)
    step = np.repeat(d, 32, axis=1)[:, :k_cols]
    assert np.all(np.abs(x_q[:, :k_cols] * step - x) <= 0.5001 * step)


# ---- products ------------------------------------------------------------------------------------

def assert_product(layer, x):
    """Fast kernel (host and portable lowerings) == naive loop, and within the activation
    quantization's error of x @ to_dense().T."""
    fast, portable, naive = layer(x), run_portable(layer, x), layer.matmul_naive(x)
    dense = layer.to_dense()
    assert fast.shape == naive.shape == (x.shape[0], layer.shape[0])
    assert fast.dtype == naive.dtype == np.float32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, naive)
    np.testing.assert_array_equal(portable, naive)
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    assert np.all(np.abs(fast - expected) <= quantization_bound(x, dense) + 1e-30)


@given(data=problems())
def test_kernel_matches_naive_and_dense(data):
    (weight, keep), n_tokens, seed, group = data
    layer = nk.pack(weight, keep, "qpanel", group=group)
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, weight.shape[1]))
    assert_product(layer, x.astype(np.float32))


@settings(max_examples=40)
@given(data=problems())
def test_exact_on_the_int8_grid(data):
    """x = x_q * d exactly (d of few significant bits, a full-scale value in every block): only
    float32 rounding of the block sums separates the product from x @ W_deq.T."""
    (weight, keep), n_tokens, seed, group = data
    rng = np.random.default_rng(seed)
    layer = nk.pack(weight, keep, "qpanel", group=group)
    k_cols = weight.shape[1]
    n_blocks = -(-k_cols // 32)
    x_q = rng.integers(-127, 128, size=(n_tokens, 32 * n_blocks))
    x_q[:, ::32] = 127 * rng.choice([-1, 1], size=(n_tokens, n_blocks))
    d = (rng.integers(1, 1024, size=(n_tokens, n_blocks)) * 2.0 ** rng.integers(
        -20, 0, size=(n_tokens, n_blocks))).astype(np.float32)
    x = (x_q * np.repeat(d, 32, axis=1))[:, :k_cols].astype(np.float32)
    assert np.array_equal(x, x_q[:, :k_cols] * np.repeat(d, 32, axis=1)[:, :k_cols])
    got_q, got_d, _ = qpanel.quantize_activations(x)
    np.testing.assert_array_equal(got_d, d)
    np.testing.assert_array_equal(got_q[:, :k_cols], x_q[:, :k_cols])
    dense = layer.to_dense().astype(np.float64)
    expected = x.astype(np.float64) @ dense.T
    bound = np.abs(x).astype(np.float64) @ np.abs(dense).T
    y = layer(x)
    np.testing.assert_array_equal(y, layer.matmul_naive(x))
    assert np.all(np.abs(y - expected) <= 5e-7 * (n_blocks + 2) * bound + 1e-30)


def test_one_block_of_integers_is_exact():
    """Integer weights and activations in one block: every step is exact, so y == x @ W."""
    rng = np.random.default_rng(5)
    weight = rng.integers(-127, 128, size=(33, 20)).astype(np.float32)
    weight[:, 0] = 127
    x = rng.integers(-127, 128, size=(5, 20)).astype(np.float32)
    x[:, 0] = 127
    layer = nk.pack(weight, None, "qpanel")
    np.testing.assert_array_equal(layer.to_dense(), weight)
    np.testing.assert_array_equal(layer(x), x @ weight.T)
    np.testing.assert_array_equal(run_portable(layer, x), x @ weight.T)


def test_edge_cases():
    rng = np.random.default_rng(0)
    for n_rows, k_cols in [(1, 1), (1, 4), (16, 1), (17, 3), (33, 64), (5, 1000), (40, 4096)]:
        weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
        for keep, group in ((np.zeros_like(weight, bool), 128), (np.ones_like(weight, bool), 128),
                            (np.ones_like(weight, bool), 96)):
            layer = nk.pack(weight, keep, "qpanel", group=group)
            for n_tokens in (1, 4, 5, 9):  # 9: two four-token passes and one more
                assert_product(layer, rng.standard_normal((n_tokens, k_cols)).astype(np.float32))
    layer = nk.pack(np.eye(4, dtype=np.float32), None, "qpanel")
    x = np.array([0, 127, -64, 5], np.float32)  # on the grid of d = 1
    np.testing.assert_array_equal(layer(x), [x])
    np.testing.assert_allclose(layer(np.arange(4, dtype=np.float32)), [[0, 1, 2, 3]], atol=0.01)


def _one_panel_kernel(dot, dot4):
    @numba.njit
    def one_panel(masks, values, gb, scales, x_q, d, sx, out):  # tokens 0-3 by dot4, 4 by dot
        nb, xs, bs = masks.shape[0] // 8, x_q.shape[1], d.shape[1]
        dot4(masks, 0, values, 0, x_q, 0, xs, d, sx, 0, bs, nb, gb, scales, 0, out, 0, 16)
        dot(masks, 0, values, 0, x_q, 4 * xs, 0, d, sx, 4 * bs, 0, nb, gb, scales, 0, out, 64, 0)

    return one_panel


@pytest.mark.parametrize("mode", _qpanel_simd.MODES)
def test_every_lowering_computes_one_panel(mode):
    """Each lowering the host can run (both on an AVX512-VNNI/VBMI2 CPU) against the naive loop."""
    if mode == "vnni" and _qpanel_simd.HOST_MODE != "vnni":
        pytest.skip("needs AVX512-VNNI and AVX512-VBMI2")
    weight, keep = random_problem(3, 16, 90, 0.4)
    weight[5, 70] = 50.0  # an outlier in the second group of 64 columns (the last is short)
    layer = nk.pack(weight, keep, "qpanel", group=64)
    a = layer.arrays
    assert a["scales"].shape == (1, 2, 16)
    values = np.concatenate([a["values"], np.full(_qpanel_simd.OVERREAD, 7, np.uint8)])
    x = np.random.default_rng(4).standard_normal((5, 90)).astype(np.float32)
    x_q, d, sx = qpanel.quantize_activations(x)
    out = np.full((5, 16), np.nan, np.float32)
    one_panel = _one_panel_kernel(_qpanel_simd.QPANEL_DOT[mode], _qpanel_simd.QPANEL_DOT4[mode])
    one_panel(a["masks"][0], values, 2, a["scales"], x_q, d, sx, out)
    np.testing.assert_array_equal(out, layer.matmul_naive(x))


@pytest.mark.skipif(CEILING < 2, reason="needs NUMBA_NUM_THREADS >= 2")
@settings(max_examples=10)
@given(n_rows=st.sampled_from([16, 200, 1100]), n_tokens=st.sampled_from([1, 3, 6, 11]),
       seed=st.integers(0, 2**32 - 1))
def test_same_bits_with_one_thread_and_two(n_rows, n_tokens, seed):
    weight, keep = random_problem(seed, n_rows, 130, 0.5)
    layer = nk.pack(weight, keep, "qpanel")
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, 130)).astype(np.float32)
    one, two = products_on_one_and_two_threads(layer, x)
    np.testing.assert_array_equal(one, two)


@settings(max_examples=20)
@given(panels=st.lists(st.integers(1, 3), min_size=2, max_size=3), last=st.integers(1, 40),
       k_cols=st.integers(1, 140), density=st.sampled_from([0.0, 0.3, 1.0]),
       tokens=st.sampled_from([1, 5]), group=st.sampled_from(GROUPS),
       seed=st.integers(0, 2**32 - 1))
def test_stacked_layer_equals_the_parts_exactly(panels, last, k_cols, density, tokens, group,
                                                seed):
    """Parts of 16 q rows (and a last part of any size) stack (arena) into one qpanel layer whose
    product holds each part's bit for bit: scales [P, G, 16] concatenate per panel as the masks
    do."""
    rng = np.random.default_rng(seed)
    rows = [16 * q for q in panels[:-1]] + [last]
    weights = [rng.standard_normal((n, k_cols)).astype(np.float32) * (rng.random((n, k_cols))
                                                                      < density) for n in rows]
    layers = [nk.pack(w, None, "qpanel", group=group) for w in weights]
    scales = np.concatenate([layer.row_scales() for layer in layers])  # [N, G]
    x = rng.standard_normal((tokens, k_cols)).astype(np.float32)
    before = [layer(x) for layer in layers]
    dense = np.concatenate([layer.to_dense() for layer in layers])
    model, block, names = one_group(layers)
    consolidate(model)
    fused = block.fused[names]
    assert fused.layer.FORMAT == "qpanel" and fused.layer.shape == (sum(rows), k_cols)
    assert fused.layer.group == group
    np.testing.assert_array_equal(fused.layer.row_scales(), scales)
    for part in fused.parts:  # the parts' scales are views of the whole
        assert np.shares_memory(part.arrays["scales"], fused.layer.arrays["scales"])
    stacked = fused.layer(x)
    for want, lo, hi in zip(before, fused.bounds, fused.bounds[1:]):
        np.testing.assert_array_equal(stacked[:, lo:hi], want)
    np.testing.assert_array_equal(fused.layer.to_dense(), dense)


# ---- stored arrays and errors --------------------------------------------------------------------

def test_to_from_arrays_without_copy_and_read_only():
    weight, keep = random_problem(7, 37, 75, 0.5)
    layer = nk.pack(weight, keep, "qpanel")
    arrays, meta = nk.to_arrays(layer)
    assert meta == {"format": "qpanel", "shape": "37,75", "schema": "1", "values": "int8",
                    "group": str(qpanel.GROUP)}
    rebuilt = rebuilt_from_read_only_views(layer)
    assert type(rebuilt) is qpanel.QPanelLinear and rebuilt.shape == (37, 75)
    assert np.array_equal(rebuilt.to_dense(), layer.to_dense())
    x = np.random.default_rng(8).standard_normal((5, 75)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(x), layer(x))
    np.testing.assert_array_equal(rebuilt.matmul_naive(x), layer(x))
    grouped = nk.pack(weight, keep, "qpanel", group=32)
    arrays, meta = nk.to_arrays(grouped)
    assert meta["group"] == "32" and arrays["scales"].shape == (3, 3, 16)
    rebuilt = nk.from_arrays(arrays, meta)
    assert rebuilt.group == 32
    np.testing.assert_array_equal(rebuilt(x), grouped(x))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(NpsparseError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_errors():
    weight, keep = random_problem(10, 20, 9, 0.5)
    _raises("qpanel values", nk.pack, weight, keep, "qpanel", values="bf16")
    for group in (0, 48, -32, 2**31, 32.0, True, "64", None):
        _raises("qpanel group must be a positive multiple of 32", nk.pack, weight, keep,
                "qpanel", group=group)
    bad = weight.copy()
    bad[0, 0], keep[0, 0] = np.inf, True
    _raises("finite", nk.pack, bad, keep, "qpanel")
    arrays, meta = nk.to_arrays(nk.pack(weight, keep, "qpanel"))
    _raises("'masks' must be 2-D uint64", nk.from_arrays,
            {**arrays, "masks": arrays["masks"].astype(np.int64)}, meta)
    _raises("'values' must be 1-D uint8", nk.from_arrays,
            {**arrays, "values": arrays["values"].view(np.int8)}, meta)
    _raises("'scales' must be 3-D float32", nk.from_arrays,
            {**arrays, "scales": arrays["scales"].astype(np.float64)}, meta)
    _raises("'scales' must be 3-D float32", nk.from_arrays,
            {**arrays, "scales": arrays["scales"].reshape(-1)}, meta)
    for group in ("48", "0", "abc", "", "1e3", str(2**64)):
        _raises("qpanel metadata 'group' must be|qpanel group must be", nk.from_arrays, arrays,
                {**meta, "group": group})
    _raises("qpanel metadata 'group'", nk.from_arrays, arrays,
            {k: v for k, v in meta.items() if k != "group"})
    # K32 = 32: any group is one scale per row; a [P, 2, 16] scales array does not fit it
    _raises("'scales' has shape", nk.from_arrays,
            {**arrays, "scales": np.zeros((2, 2, 16), np.float32)}, meta)
    _raises("needs array 'scales'", nk.from_arrays,
            {k: v for k, v in arrays.items() if k != "scales"}, meta)
    _raises("'masks' has shape", nk.from_arrays, arrays, {**meta, "shape": "40,9"})
    _raises("'scales' has shape", nk.from_arrays, {**arrays, "scales": arrays["scales"][:1]},
            meta)
    padding_row = arrays["masks"].copy()
    padding_row[1, 0] |= np.uint64(1 << (4 * 7))  # row 16 + 7 = 23 of a 20-row weight
    _raises("bits set past row 20", nk.from_arrays, {**arrays, "masks": padding_row}, meta)
    padding_col = arrays["masks"].copy()
    padding_col[0, 2] |= np.uint64(1 << 1)  # column 9 of a 9-column weight
    _raises("bits set past", nk.from_arrays, {**arrays, "masks": padding_col}, meta)
    moved = arrays["panel_ptr"].copy()
    moved[1] += 1
    _raises("does not match", nk.from_arrays, {**arrays, "panel_ptr": moved}, meta)
    short = arrays["panel_ptr"].copy()
    short[-1] -= 1
    _raises("'panel_ptr' must rise", nk.from_arrays, {**arrays, "panel_ptr": short}, meta)
    for value in (np.nan, np.inf, -1.0):
        scales = arrays["scales"].copy()
        scales[0, 0, 2] = value
        _raises("'scales' must be finite", nk.from_arrays, {**arrays, "scales": scales}, meta)
