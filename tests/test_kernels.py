"""Packed formats and their kernels: structure first, then values, then products and errors.

Every fast kernel must equal its naive reference and the dense product ``x @ (W * mask).T`` (up to
float32 summation order) on random shapes, sparsities and edge cases.
"""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npsparse.kernels as nk
from npsparse.errors import NpsparseError
from npsparse.kernels import _simd, bitmask, nm

# (format, options, needs an N:M mask)
CASES = [
    ("bf16", {}, None),
    ("csr", {"values": "bf16"}, None),
    ("csr", {"values": "fp32"}, None),
    ("bitmask", {"values": "bf16"}, None),
    ("bitmask", {"values": "int8"}, None),
    ("nm", {"pattern": "2:4", "values": "bf16"}, (2, 4)),
    ("nm", {"pattern": "4:8", "values": "bf16"}, (4, 8)),
    ("nm", {"pattern": "2:4", "values": "int8"}, (2, 4)),
    ("nm", {"pattern": "1:4", "values": "bf16"}, (1, 4)),  # 3 kept: naive fallback
]
IDS = [f"{f}-{'-'.join(o.values()) or 'plain'}" for f, o, _ in CASES]


def random_problem(seed, n_rows, k_cols, density, pattern):
    """(W [N, K] float32, keep [N, K] bool): unstructured, or magnitude N:M per group."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
    if pattern is None:
        keep = rng.random((n_rows, k_cols)) < density
    else:
        n, m = pattern
        groups = np.abs(weight).reshape(n_rows, k_cols // m, m)
        rank = np.argsort(np.argsort(groups, axis=2, kind="stable"), axis=2)
        keep = (rank >= n).reshape(n_rows, k_cols)
        keep &= rng.random(keep.shape) < max(density, 0.5) + 0.5  # sometimes fewer than M-N
    return weight, keep


def assert_product(layer, x, dense):
    """Fast kernel == naive kernel == x @ dense.T, to float32 summation-order accuracy."""
    bound = np.abs(np.asarray(x, np.float32)) @ np.abs(dense).T  # [T, N]
    tol = 2e-6 * bound + 1e-30
    expected = np.asarray(x, np.float64) @ dense.T.astype(np.float64)
    fast = layer(x)
    naive = layer.matmul_naive(np.ascontiguousarray(x))
    assert fast.shape == naive.shape == expected.shape
    assert fast.dtype == naive.dtype == np.float32
    assert np.all(np.abs(fast - expected) <= tol)
    assert np.all(np.abs(naive - expected) <= tol)




@st.composite
def problems(draw, pattern):
    n_rows = draw(st.integers(1, 70))
    if pattern is None:
        k_cols = draw(st.one_of(st.integers(1, 130), st.sampled_from([32, 64, 96, 160])))
    else:
        m = pattern[1]
        k_cols = m * draw(st.one_of(st.integers(1, 20), st.sampled_from([8, 16, 24])))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    n_tokens = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 8, 17, 64]))
    return random_problem(seed, n_rows, k_cols, density, pattern), n_tokens, seed


def pack_case(case, weight, keep):
    fmt, options, _ = case
    return nk.pack(weight, keep, fmt, **options)


# ---- structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["bf16", "fp32"])
@given(data=problems(None))
def test_csr_structure(values, data):
    (weight, keep), _, _ = data
    layer = nk.pack(weight, keep, "csr", values=values)
    a = layer.arrays
    assert a["cols"].dtype == np.uint16 and a["row_ptr"].dtype == np.int64
    assert a["values"].dtype == (np.uint16 if values == "bf16" else np.float32)
    assert a["row_ptr"][0] == 0 and a["row_ptr"][-1] == keep.sum() == layer.nnz
    assert np.array_equal(np.diff(a["row_ptr"]), keep.sum(axis=1))
    for n in range(keep.shape[0]):
        cols = a["cols"][a["row_ptr"][n]:a["row_ptr"][n + 1]].astype(np.int64)
        assert np.all(np.diff(cols) > 0) and np.all(cols < keep.shape[1])
        assert np.array_equal(cols, np.flatnonzero(keep[n]))


def test_csr_wide_uses_int32_indices():
    weight = np.zeros((1, 70000), np.float32)
    weight[0, [3, 65535, 65536, 69999]] = [1, 2, 3, 4]
    layer = nk.pack(weight, None, "csr")
    assert layer.arrays["cols"].dtype == np.int32
    assert list(layer.arrays["cols"]) == [3, 65535, 65536, 69999]
    x = np.ones((1, 70000), np.float32)
    assert layer(x)[0, 0] == 10.0


@pytest.mark.parametrize("values", ["bf16", "int8"])
@given(data=problems(None))
def test_bitmask_structure(values, data):
    (weight, keep), _, _ = data
    layer = nk.pack(weight, keep, "bitmask", values=values)
    a = layer.arrays
    n_rows, k_cols = keep.shape
    assert a["masks"].dtype == np.uint32 and a["masks"].shape == (n_rows, (k_cols + 31) // 32)
    assert a["values"].dtype == (np.uint16 if values == "bf16" else np.int8)
    assert a["values"].shape == (keep.sum(),) and layer.nnz == keep.sum()
    assert np.array_equal(np.diff(a["row_ptr"]), keep.sum(axis=1)) and a["row_ptr"][0] == 0
    assert np.array_equal(layer.keep_mask(), keep)
    if k_cols % 32:  # padding bits of the last word are clear
        assert not np.any(a["masks"][:, -1] >> np.uint32(k_cols % 32))
    if values == "int8":
        assert a["scales"].dtype == np.float32 and a["scales"].shape == (n_rows,)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4), (3, 8)])
@given(data=st.data())
def test_nm_structure(pattern, data):
    (weight, keep), _, _ = data.draw(problems(pattern))
    n, m = pattern
    layer = nk.pack(weight, keep, "nm", pattern=f"{n}:{m}")
    n_rows, k_cols = keep.shape
    positions = layer.positions()  # [N, G, M-N]
    assert layer.arrays["indices"].dtype == np.uint8
    stream_bits = (k_cols // m) * (m - n) * nm.index_bits(m)
    assert layer.arrays["indices"].shape == (n_rows, (stream_bits + 7) // 8)
    assert positions.shape == (n_rows, k_cols // m, m - n)
    assert np.all(positions < m) and np.all(np.diff(positions.astype(int), axis=2) > 0)
    stored = layer.keep_mask()
    assert np.array_equal(stored.reshape(n_rows, -1, m).sum(axis=2),
                          np.full((n_rows, k_cols // m), m - n))  # exactly M-N per group
    assert np.all(stored[keep])  # every kept weight is stored
    assert layer.arrays["values"].shape == (n_rows, k_cols // m * (m - n))
    assert layer.nnz == stored.sum()


def test_index_bits():
    assert [nm.index_bits(m) for m in (2, 4, 8, 16)] == [1, 2, 3, 4]


# ---- values: pack -> unpack round trip ----------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
@given(data=st.data())
def test_round_trip(case, data):
    (weight, keep), _, _ = data.draw(problems(case[2]))
    layer = pack_case(case, weight, keep)
    dense = layer.to_dense()
    kept = np.where(keep, weight, np.float32(0))
    assert dense.dtype == np.float32 and dense.shape == weight.shape
    assert np.all(dense[~keep] == 0)
    values = case[1].get("values")
    if values == "fp32":
        assert np.array_equal(dense, kept)
    elif values == "int8":
        scales = layer.arrays["scales"]
        # Half a step, plus float32 rounding of w / scale and q * scale: a tie (w / scale =
        # 119.5, say) rounds to even and lands a few ulps of w past the half step.
        ulps = np.abs(kept) * 2.0**-22
        if case[0] == "bitmask":  # nm scales come from the stored (kept + filler) values alike
            assert np.all(np.abs(dense - kept) <= scales[:, None] / 2 + ulps)
        assert np.all(np.abs(dense - kept) <= np.abs(kept).max(axis=1, initial=0)[:, None] / 254
                      * (1 + 1e-6) + ulps + 1e-30)
    else:
        assert np.array_equal(dense, nk.bf16_round(kept))


# ---- products ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
@given(data=st.data())
def test_kernels_match_naive_and_dense(case, data):
    (weight, keep), n_tokens, seed = data.draw(problems(case[2]))
    layer = pack_case(case, weight, keep)
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, weight.shape[1]))
    assert_product(layer, x.astype(np.float32), layer.to_dense())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_edge_cases(case):
    pattern = case[2]
    m = pattern[1] if pattern else 1
    rng = np.random.default_rng(0)
    shapes = [(1, 64 * m // m * m), (5, m), (3, 32 * m), (1, m)]
    for n_rows, k_cols in shapes:
        weight = rng.standard_normal((n_rows, k_cols)).astype(np.float32)
        for keep in (np.zeros_like(weight, bool), np.ones_like(weight, bool) if not pattern else
                     random_problem(1, n_rows, k_cols, 0.5, pattern)[1]):
            keep = keep.copy()
            keep[0] = False  # an empty row
            layer = pack_case(case, weight, keep)
            for n_tokens in (1, 4, 64):
                x = rng.standard_normal((n_tokens, k_cols)).astype(np.float32)
                assert_product(layer, x, layer.to_dense())
    all_zero = pack_case(case, np.zeros((7, 32 * m), np.float32), None)
    assert np.all(all_zero(np.ones((3, 32 * m), np.float32)) == 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_read_only_arrays_and_non_contiguous_x(case):
    pattern = case[2]
    k_cols = 96 if not pattern else 12 * pattern[1]
    weight, keep = random_problem(3, 45, k_cols, 0.4, pattern)
    arrays, meta = nk.to_arrays(pack_case(case, weight, keep))
    frozen = {}
    for name, a in arrays.items():
        frozen[name] = a.copy()
        frozen[name].flags.writeable = False
    layer = nk.from_arrays(frozen, meta)
    dense = layer.to_dense()
    rng = np.random.default_rng(4)
    wide = rng.standard_normal((9, 2 * k_cols)).astype(np.float32)
    for x in (wide[:, ::2], wide[:1, ::2], np.asfortranarray(wide[:, :k_cols])):
        assert not x.flags.c_contiguous or x.shape[0] == 1
        assert_product(layer, x, dense)
    x_ro = np.ascontiguousarray(wide[:3, :k_cols])
    x_ro.flags.writeable = False
    assert_product(layer, x_ro, dense)


def test_dense_k_vector_input():
    layer = nk.pack(np.eye(4, dtype=np.float32), None, "bitmask")
    assert np.array_equal(layer(np.arange(4, dtype=np.float32)), [[0, 1, 2, 3]])


@numba.njit
def _expand_both(masks, values, x, out_x86, out_portable):
    a = _simd.expand_dot(masks, 0, values, 0, x, 0, masks.shape[0])
    b = _simd.expand_dot_portable(masks, 0, values, 0, x, 0, masks.shape[0])
    _simd.expand_row(masks, 0, values, 0, out_x86, 0, masks.shape[0])
    _simd.expand_row_portable(masks, 0, values, 0, out_portable, 0, masks.shape[0])
    return a, b


@pytest.mark.parametrize("dtype", [np.uint16, np.int8])
def test_portable_expand_matches_default(dtype):
    rng = np.random.default_rng(5)
    keep = rng.random((1, 96)) < 0.4
    masks = bitmask.pack_bits(keep)[0]
    values = rng.integers(0, 100, size=keep.sum() + _simd.OVERREAD).astype(dtype)
    x = rng.standard_normal(96).astype(np.float32)
    out_a, out_b = np.empty(96, np.float32), np.empty(96, np.float32)
    a, b = _expand_both(masks, values, x, out_a, out_b)
    assert np.array_equal(out_a, out_b)
    decoded = values[: keep.sum()].astype(np.float32)
    if dtype == np.uint16:
        decoded = nk.from_bf16(values[: keep.sum()])
    assert np.array_equal(out_a[keep[0]], decoded) and np.all(out_a[~keep[0]] == 0)
    assert np.isclose(a, b, rtol=1e-5) and np.isclose(a, out_a @ x, rtol=1e-5)


def test_set_threads():
    before = numba.get_num_threads()
    layer = nk.pack(*random_problem(6, 300, 256, 0.3, None), "bitmask")
    x = np.ones((1, 256), np.float32)
    expected = layer(x)
    try:
        assert nk.set_threads(1) == 1
        assert np.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        nk.set_threads(before)
    with pytest.raises(NpsparseError, match="threads"):
        nk.set_threads(10**6)


# ---- serialisation and choice ------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES + [("dense", {}, None)], ids=IDS + ["dense"])
def test_to_from_arrays_without_copy(case):
    pattern = case[2]
    weight, keep = random_problem(7, 20, 64 if not pattern else 16 * pattern[1], 0.5, pattern)
    layer = pack_case(case, weight, keep)
    arrays, meta = nk.to_arrays(layer)
    assert meta["format"] == case[0] and meta["schema"] == "1"
    assert meta["shape"] == f"{weight.shape[0]},{weight.shape[1]}"
    assert all(isinstance(v, str) for v in meta.values())
    rebuilt = nk.from_arrays(arrays, meta)
    assert type(rebuilt) is type(layer) and rebuilt.shape == layer.shape
    assert rebuilt.nbytes == layer.nbytes
    for name, a in nk.to_arrays(rebuilt)[0].items():
        assert np.shares_memory(a, arrays[name])
    assert np.array_equal(rebuilt.to_dense(), layer.to_dense())


@pytest.mark.parametrize("row_mask", nk.ROW_MASKS)
@given(data=problems(None))
def test_choose_format_picks_fewest_bytes(row_mask, data):
    (weight, keep), _, _ = data
    fmt, options = nk.choose_format(weight, keep, row_mask)
    chosen = nk.pack(weight, keep, fmt, **options).nbytes
    sizes = nk.packed_nbytes(weight, keep, row_mask)
    assert chosen == min(sizes.values())
    assert (row_mask, "") in sizes and not set(sizes) & {(m, "") for m in nk.ROW_MASKS
                                                          if m != row_mask}
    for (name, pattern), size in sizes.items():
        opts = {"pattern": pattern} if pattern else {}
        assert nk.pack(weight, keep, name, **opts).nbytes == size  # the estimate is exact


@pytest.mark.parametrize("row_mask", nk.ROW_MASKS)
def test_choose_format_examples(row_mask):
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    assert nk.choose_format(weight, None, row_mask) == ("bf16", {})
    _, keep24 = random_problem(8, 64, 256, 1.0, (2, 4))
    assert nk.choose_format(weight, keep24, row_mask)[0] in ("nm", row_mask)
    sparse70 = rng.random(weight.shape) < 0.3
    assert nk.choose_format(weight, sparse70, row_mask) == (row_mask, {"values": "bf16"})
    sparse98 = rng.random(weight.shape) < 0.02
    assert nk.choose_format(weight, sparse98, row_mask) == ("csr", {"values": "bf16"})


def test_auto_follows_the_row_mask_switch(monkeypatch):
    weight, keep = random_problem(9, 64, 256, 0.3, None)
    weight = np.where(keep, weight, np.float32(0.0))
    for row_mask, cls in (("panel", nk.PanelLinear), ("bitmask", nk.BitmaskLinear)):
        monkeypatch.setattr(nk, "AUTO_ROW_MASK", row_mask)
        assert nk.choose_format(weight, keep)[0] == row_mask
        assert type(nk.pack(weight, keep)) is cls
    with pytest.raises(NpsparseError, match="row_mask must be one of"):
        nk.choose_format(weight, keep, "csr")


# ---- bad input: one clear line -------------------------------------------------------------------

def _raises(match, fn, *args, **kwargs):
    with pytest.raises(NpsparseError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_errors():
    w = np.ones((4, 8), np.float32)
    _raises("mask shape", nk.pack, w, np.ones((4, 7), bool), "bitmask")
    _raises("not 2:4", nk.pack, w, np.ones((4, 8), bool), "nm", pattern="2:4")
    _raises("not divisible by M=8", nk.pack, np.ones((2, 12), np.float32), None, "nm",
            pattern="4:8")
    _raises("unknown weight format 'blocked'", nk.pack, w, None, "blocked")
    _raises("N:M pattern", nk.pack, w, None, "nm", pattern="4:4")
    _raises("N:M pattern", nk.pack, w, None, "nm", pattern="two:four")
    _raises("bitmask values", nk.pack, w, None, "bitmask", values="fp8")
    _raises("format 'csr'", nk.pack, w, None, "csr", pattern="2:4")
    _raises("float64", nk.pack, np.full((2, 2), 0.1), None, "csr")
    _raises("0/1", nk.pack, w, np.full((4, 8), 2), "bitmask")
    _raises("2-D", nk.pack, np.ones(8, np.float32), None, "csr")
    layer = nk.pack(w, None, "bitmask")
    _raises(r"expected \[T, 8\]", layer, np.ones((1, 7), np.float32))
    _raises("float64", layer, np.full((1, 8), 0.1))
    arrays, meta = nk.to_arrays(layer)
    _raises("schema", nk.from_arrays, arrays, {**meta, "schema": "99"})
    _raises("unknown weight format", nk.from_arrays, arrays, {**meta, "format": "zip"})
    _raises("'masks' must be 2-D uint32", nk.from_arrays,
            {**arrays, "masks": arrays["masks"].astype(np.int64)}, meta)
    _raises("needs array 'row_ptr'", nk.from_arrays,
            {k: v for k, v in arrays.items() if k != "row_ptr"}, meta)


def test_lossless_conversions_are_accepted():
    w64 = np.array([[0.5, -2.0, 0.0, 3.0]])  # float64 that float32 holds exactly
    layer = nk.pack(w64, np.array([[1, 1, 0, 1]]), "csr", values="fp32")
    assert np.array_equal(layer.to_dense(), [[0.5, -2.0, 0.0, 3.0]])
    assert layer(np.ones((1, 4)))[0, 0] == 1.5




@pytest.mark.parametrize("k_cols", [64, 128, 576, 1536])
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(1, 40),
       density=st.sampled_from([0.0, 0.3, 1.0]), n_tokens=st.sampled_from([1, 3]))
def test_nm24_blend_gemv_equals_naive(k_cols, seed, n_rows, density, n_tokens):
    """2:4 bf16 GEMVs with K % 64 == 0 take the blend kernel (nm24_dot); it must equal the rest."""
    weight, keep = random_problem(seed, n_rows, k_cols, density, (2, 4))
    layer = nk.pack(weight, keep, "nm", pattern="2:4")
    assert layer._blend_gemv == (_simd.HAS_PERMUTE and _simd.HAS_BMI2)
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, k_cols)).astype(np.float32)
    assert_product(layer, x, layer.to_dense())
