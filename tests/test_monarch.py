"""Monarch matrices: sizes, the definition, projection optimality, products, backward, storage.

The projection is checked as an optimisation result, not against itself: no perturbation of the
projected factors and no random Monarch matrix of the same structure is closer to ``W`` in
Frobenius norm, its error is exactly the discarded singular values, and a Monarch ``W`` comes
back unchanged. Products (batched, GEMV, naive) are checked against ``x @ to_dense().T`` and
``to_dense()`` against ``P L P^T R`` built from explicit permutation and block-diagonal matrices.
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import block_diag

import npsparse.kernels as nk
from npsparse.errors import NpsparseError
from npsparse.kernels.bf16 import to_bf16
from npsparse.kernels.monarch import from_middle, to_middle
from npsparse.monarch import (MonarchLinear, monarch_backward, monarch_dense, monarch_forward,
                              monarch_sizes, parameter_count, project, project_factors)

seeds = st.integers(0, 2**32 - 1)


@st.composite
def shapes(draw):
    """(N, K, b) with b dividing N and K and b^2 dividing min(N, K): square or rectangular."""
    b = draw(st.integers(2, 4))
    r = draw(st.integers(1, 3))
    small = b * b * r
    large = b * (b * r + draw(st.sampled_from([0, 0, 1, 2, 5])))
    if draw(st.booleans()):
        return small, large, b
    return large, small, b


def random_factors(rng, n_rows, k_cols, b, dtype=np.float64):
    sizes = monarch_sizes((n_rows, k_cols), b)
    return (rng.standard_normal(sizes.right_shape).astype(dtype),
            rng.standard_normal(sizes.left_shape).astype(dtype))


def error(weight, right, left):
    return np.linalg.norm(weight - monarch_dense(right, left))


# ---- sizes and the definition ----------------------------------------------------------------

@pytest.mark.parametrize("shape, b, right, left, params", [
    ((576, 576), 4, (4, 144, 144), (4, 144, 144), 2 * 576 * 576 // 4),
    ((1536, 576), 4, (4, 144, 144), (4, 384, 144), 144 * (1536 + 576)),  # up/gate: R square
    ((576, 1536), 4, (4, 144, 384), (4, 144, 144), 144 * (1536 + 576)),  # down: L square
    ((192, 576), 8, (8, 24, 72), (8, 24, 24), 24 * (192 + 576)),  # k/v
    ((576, 576), 24, (24, 24, 24), (24, 24, 24), 2 * 24 ** 3),  # b^2 = n: rank 1
])
def test_sizes_of_smollm2_shapes(shape, b, right, left, params):
    sizes = monarch_sizes(shape, b)
    assert (sizes.right_shape, sizes.left_shape, sizes.parameters) == (right, left, params)
    assert parameter_count(shape, b) == params
    assert sizes.rank == sizes.inner // b
    layer = MonarchLinear.from_factors(np.zeros(right, np.float32), np.zeros(left, np.float32))
    assert layer.shape == shape and layer.nnz == params and layer.blocks == b


@pytest.mark.parametrize("shape, b, message", [
    ((576, 576), 1, "at least 2"),
    ((576, 576), 0, "at least 2"),
    ((576, 576), 5, "must divide both"),
    ((1536, 576), 7, "must divide both"),
    ((576, 1536), 16, "b\\^2 = 256 must divide"),  # 16 divides both, 256 not 576
    ((192, 576), 2.0, "integer"),
    ((192, 576), True, "integer"),
])
def test_bad_blocks_are_refused_in_one_line(shape, b, message):
    with pytest.raises(NpsparseError, match=message) as info:
        project(np.zeros(shape, np.float32), b)
    assert "\n" not in str(info.value)


def test_bad_weights_are_refused():
    with pytest.raises(NpsparseError, match="2-D"):
        project(np.zeros((4, 4, 4), np.float32), 2)
    with pytest.raises(NpsparseError, match="dtype"):
        project(np.zeros((8, 8), np.complex64), 2)
    with pytest.raises(NpsparseError, match="values"):
        project(np.zeros((8, 8), np.float32), 2, values="int8")


def test_float64_weight_is_projected_as_given():
    # float32 cannot hold these values; project used to refuse them though its docstring
    # promised float64
    weight = np.random.default_rng(11).standard_normal((48, 24))  # [N, K] float64
    right, left = project_factors(weight, 2)  # float64 factors of W itself
    layer = project(weight, 2)
    assert layer.values_type == "fp32" and layer.shape == (48, 24)
    np.testing.assert_array_equal(layer.arrays["right"], right.astype(np.float32))
    np.testing.assert_array_equal(layer.arrays["left"], left.astype(np.float32))
    best = error(weight, right, left)
    assert np.linalg.norm(weight - layer.to_dense()) == pytest.approx(best, rel=1e-5)
    in_bf16 = project(weight, 2, values="bf16")
    np.testing.assert_array_equal(in_bf16.arrays["right"], to_bf16(right.astype(np.float32)))
    layer = nk.pack(weight, np.ones(weight.shape, bool), "monarch", blocks=2)  # all kept: fine
    np.testing.assert_array_equal(layer.arrays["left"], left.astype(np.float32))
    with pytest.raises(NpsparseError, match="no mask"):
        nk.pack(weight, weight > 0, "monarch", blocks=2)


def permutation(b, m):
    """P for a length b m vector: read it as [b, m], transpose, flatten (P z = z.reshape(b, m).T
    .ravel())."""
    perm = np.arange(b * m).reshape(b, m).T.ravel()
    return np.eye(b * m)[perm]


@given(shape=shapes(), seed=seeds)
@settings(max_examples=20)
def test_dense_is_p_l_pt_r(shape, seed):
    n_rows, k_cols, b = shape
    right, left = random_factors(np.random.default_rng(seed), n_rows, k_cols, b)
    q, s = right.shape[1], left.shape[1]
    expected = (permutation(b, s) @ block_diag(*left) @ permutation(b, q).T
                @ block_diag(*right))
    np.testing.assert_allclose(monarch_dense(right, left), expected, rtol=1e-12, atol=1e-12)


@given(shape=shapes(), t=st.integers(1, 4), seed=seeds)
@settings(max_examples=20)
def test_middle_permutations_are_inverse(shape, t, seed):
    b, q = shape[2], min(shape[:2]) // shape[2]
    u = np.random.default_rng(seed).standard_normal((b, t, q))
    np.testing.assert_array_equal(from_middle(to_middle(u)), u)
    np.testing.assert_array_equal(to_middle(from_middle(u)), u)


# ---- projection --------------------------------------------------------------------------

@given(shape=shapes(), seed=seeds)
@settings(max_examples=25)
def test_projection_is_optimal(shape, seed):
    n_rows, k_cols, b = shape
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, k_cols))
    right, left = project_factors(weight, b)
    assert right.dtype == left.dtype == np.float64
    best = error(weight, right, left)
    # the error is the discarded singular values of the b x b sub-blocks [N/b, K/b]
    sizes = monarch_sizes(weight.shape, b)
    sub = weight.reshape(sizes.out_block, b, b, sizes.in_block).transpose(1, 2, 0, 3)
    discarded = np.linalg.svd(sub, compute_uv=False)[..., sizes.rank:]
    assert best == pytest.approx(np.sqrt(np.sum(discarded ** 2)), rel=1e-9, abs=1e-12)
    for scale in (1e-3, 1e-1, 1.0):  # nearby and far Monarch matrices of the same structure
        d_right, d_left = random_factors(rng, n_rows, k_cols, b)
        assert error(weight, right + scale * d_right, left + scale * d_left) >= best * (1 - 1e-12)
        assert error(weight, right + scale * d_right, left) >= best * (1 - 1e-12)
    for _ in range(3):
        other = random_factors(rng, n_rows, k_cols, b)
        assert error(weight, *other) >= best


@given(shape=shapes(), seed=seeds)
@settings(max_examples=25)
def test_a_monarch_matrix_is_recovered_exactly(shape, seed):
    n_rows, k_cols, b = shape
    monarch = monarch_dense(*random_factors(np.random.default_rng(seed), n_rows, k_cols, b))
    again = monarch_dense(*project_factors(monarch, b))
    np.testing.assert_allclose(again, monarch, rtol=0, atol=1e-10 * np.abs(monarch).max())
    layer = project(monarch.astype(np.float32), b)  # float32 end to end
    np.testing.assert_allclose(layer.to_dense(), monarch, rtol=0,
                               atol=1e-5 * np.abs(monarch).max())


def test_projection_of_float32_is_float32_and_bf16_rounds_the_factors():
    weight = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    right, left = project_factors(weight, 4)
    assert right.dtype == left.dtype == np.float32
    layer = project(weight, 4, values="bf16")
    assert layer.arrays["right"].dtype == np.uint16 and layer.values_type == "bf16"
    expected = monarch_dense(nk.bf16_round(right), nk.bf16_round(left))
    np.testing.assert_allclose(layer.to_dense(), expected, rtol=1e-6, atol=1e-6)


# ---- products -------------------------------------------------------------------------------

def assert_product(layer, x):
    """Fast (batched or GEMV) == naive == x @ to_dense().T, to float32 summation accuracy."""
    right, left = layer.factors()
    bound = np.abs(x) @ monarch_dense(np.abs(right), np.abs(left)).T  # [T, N]
    tol = 1e-5 * bound + 1e-30
    expected = x.astype(np.float64) @ layer.to_dense().T.astype(np.float64)
    for y in (layer(x), layer.matmul_naive(x)):
        assert y.shape == expected.shape and y.dtype == np.float32
        assert np.all(np.abs(y - expected) <= tol)


@given(shape=shapes(), t=st.sampled_from([1, 1, 2, 3, 7, 17]),
       values=st.sampled_from(["fp32", "bf16"]), seed=seeds)
@settings(max_examples=30)
def test_product_equals_dense(shape, t, values, seed):
    n_rows, k_cols, b = shape
    rng = np.random.default_rng(seed)
    layer = MonarchLinear.from_factors(*random_factors(rng, n_rows, k_cols, b, np.float32),
                                       values=values)
    assert layer.shape == (n_rows, k_cols)
    assert_product(layer, rng.standard_normal((t, k_cols)).astype(np.float32))


@pytest.mark.parametrize("shape, b", [((1536, 576), 4), ((576, 1536), 4), ((192, 576), 8),
                                      ((576, 576), 2)])
def test_product_on_smollm2_shapes(shape, b):
    rng = np.random.default_rng(0)
    layer = MonarchLinear.from_factors(*random_factors(rng, *shape, b, np.float32))
    for t in (1, 5):
        assert_product(layer, rng.standard_normal((t, shape[1])).astype(np.float32))
    assert layer(rng.standard_normal(shape[1]).astype(np.float32)).shape == (1, shape[0])


def test_product_checks_x():
    layer = project(np.ones((8, 16), np.float32), 2)
    with pytest.raises(NpsparseError, match="expected"):
        layer(np.ones((2, 8), np.float32))


# ---- backward ----------------------------------------------------------------------------

EPS = 1e-6


@given(shape=shapes(), t=st.integers(1, 5), seed=seeds)
@settings(max_examples=25)
def test_backward_matches_finite_differences(shape, t, seed):
    n_rows, k_cols, b = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k_cols))
    right, left = random_factors(rng, n_rows, k_cols, b)
    out_weight = rng.standard_normal((t, n_rows))
    y, middle = monarch_forward(x, right, left)
    np.testing.assert_allclose(y, x @ monarch_dense(right, left).T, rtol=1e-10, atol=1e-10)
    grads = monarch_backward(out_weight, x, right, left, middle)
    again = monarch_backward(out_weight, x, right, left)  # middle recomputed
    inputs = [x, right, left]
    for i, (a, g) in enumerate(zip(inputs, grads)):
        assert g.shape == a.shape and g.dtype == np.float64
        np.testing.assert_allclose(again[i], g, rtol=1e-12, atol=1e-12)
        v = rng.standard_normal(a.shape)
        plus, minus = list(inputs), list(inputs)
        plus[i], minus[i] = a + EPS * v, a - EPS * v
        numeric = (np.sum(out_weight * monarch_forward(*plus)[0])
                   - np.sum(out_weight * monarch_forward(*minus)[0])) / (2 * EPS)
        assert np.sum(g * v) == pytest.approx(numeric, rel=1e-6, abs=1e-8), f"input {i}"


def test_backward_keeps_float32():
    rng = np.random.default_rng(0)
    right, left = random_factors(rng, 16, 32, 2, np.float32)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    grads = monarch_backward(np.ones((3, 16), np.float32), x, right, left)
    assert all(g.dtype == np.float32 for g in grads)


# ---- storage -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["fp32", "bf16"])
def test_round_trip_through_arrays(values):
    rng = np.random.default_rng(3)
    layer = project(rng.standard_normal((96, 48)).astype(np.float32), 4, values=values)
    arrays, metadata = layer.to_arrays()
    assert metadata == {"format": "monarch", "shape": "96,48", "schema": "1", "values": values,
                        "blocks": "4"}
    stored = {}
    for name, a in arrays.items():  # read-only, as memory-mapped arrays are
        stored[name] = a.copy()
        stored[name].flags.writeable = False
    again = MonarchLinear.from_arrays(stored, metadata)
    assert all(again.arrays[name] is stored[name] for name in stored)  # not copied
    np.testing.assert_array_equal(again.to_dense(), layer.to_dense())
    x = rng.standard_normal((4, 48)).astype(np.float32)
    np.testing.assert_array_equal(again(x), layer(x))
    assert_product(again, x[:1])  # read-only arrays: another compiled GEMV, same product
    assert again.nbytes == layer.nbytes == layer.nnz * (4 if values == "fp32" else 2)


def test_from_arrays_refuses_what_does_not_fit():
    layer = project(np.ones((96, 48), np.float32), 4)
    arrays, metadata = layer.to_arrays()
    with pytest.raises(NpsparseError, match="'left'"):
        MonarchLinear.from_arrays({"right": arrays["right"]}, metadata)
    with pytest.raises(NpsparseError, match="float32"):
        MonarchLinear.from_arrays({**arrays, "left": arrays["left"].astype(np.float64)},
                                  metadata)
    with pytest.raises(NpsparseError, match="shape"):
        MonarchLinear.from_arrays(arrays, {**metadata, "shape": "48,96"})
    with pytest.raises(NpsparseError, match="blocks"):
        MonarchLinear.from_arrays(arrays, {**metadata, "blocks": "2"})
    with pytest.raises(NpsparseError, match="values"):
        MonarchLinear.from_arrays(arrays, {**metadata, "values": "int8"})
    with pytest.raises(NpsparseError, match="3-D"):
        MonarchLinear.from_factors(arrays["right"][0], arrays["left"])


# ---- a model's layers as Monarch matrices: npsparse monarch ---------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_path):
    """A tiny random LLaMA folder (the SmolLM2 tokenizer, so the CLI can load it)."""
    from helpers import tiny_model

    from npsparse.io import open_checkpoint, write_hf_dir
    from npsparse.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    out = tmp_path_factory.mktemp("tiny") / "llama"
    write_hf_dir(out, model.config, model.state_dict(), tokenizer_json=tokenizer.to_json())
    return out


def test_select_layers():
    from npsparse.monarch import select_layers

    names = [f"model.layers.{i}.{n}" for i in (0, 1, 12) for n in ("mlp.up_proj", "self_attn.q")]
    assert select_layers(names) == names
    assert select_layers(names, ["*.mlp.*"]) == names[0::2]
    assert select_layers(names, ["model.layers.1", "model.layers.12.self_attn.q"]) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q", "model.layers.12.self_attn.q"]
    with pytest.raises(NpsparseError, match="no linear layer matches 'model.layers.2'"):
        select_layers(names, ["model.layers.2"])


def test_monarch_model_stores_factors_and_runs(tiny_dir, tmp_path):
    import npsparse
    from npsparse.linear import DenseLinear
    from npsparse.monarch import monarch_model

    report = monarch_model(tiny_dir, tmp_path / "m", 2, layers=["*.mlp.*"])
    chosen = [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate_proj", "up_proj",
                                                                     "down_proj")]
    assert sorted(report["monarch"]["layers"]) == sorted(chosen)
    assert report["formats"] == {"monarch": 6, "dense": 8}
    dense = npsparse.load(tiny_dir)
    loaded = npsparse.load(tmp_path / "m")
    expected = npsparse.load(tiny_dir)
    for name, layer in loaded.model.linears().items():
        weight = dense.model.linears()[name].to_dense()
        if name in chosen:
            assert isinstance(layer, MonarchLinear) and layer.blocks == 2
            projected = project(weight, 2)
            for key in ("right", "left"):
                np.testing.assert_array_equal(layer.arrays[key], projected.arrays[key])
            error = np.linalg.norm(weight - projected.to_dense()) / np.linalg.norm(weight)
            assert report["monarch"]["layers"][name]["relative_error"] == pytest.approx(error)
            expected.model.set_linear(name, DenseLinear(projected.to_dense()))
        else:
            assert isinstance(layer, DenseLinear)
    for block in loaded.model.blocks:  # gate/up are not stacked into one (wrong) Monarch layer
        assert not any(isinstance(f.layer, MonarchLinear) for f in block.fused.values())
    ids = loaded.encode("def area(r):\n    return 3.14159 * r ** 2")
    np.testing.assert_allclose(loaded.logits(ids), expected.logits(ids), rtol=1e-4, atol=1e-4)
    out = loaded.generate("x = ", 4)  # the one-token path (GEMV) through the decode body
    assert len(out.ids) == 4


def test_cli_monarch_and_its_errors(tiny_dir, tmp_path, capsys):
    from npsparse.cli import main

    out = tmp_path / "m"
    assert main(["monarch", str(tiny_dir), "--blocks", "4", "--values", "bf16",
                 "--layers", "model.layers.1", "--out", str(out)]) == 0
    assert "projected 7 layers" in capsys.readouterr().out
    packed = json.loads((out / "packed.json").read_text())
    assert packed["formats"] == {"monarch": 7, "dense": 7} and packed["monarch"]["values"] == "bf16"
    assert main(["eval", str(out), "--data", str(tiny_dir / "config.json"), "--seqlen", "8",
                 "--windows", "1"]) == 0
    for argv, message in [
        (["--blocks", "1"], "at least 2"),
        (["--blocks", "3"], "model.layers.0.self_attn.q_proj: Monarch blocks b = 3 must divide"),
        (["--blocks", "2", "--layers", "model.layers.9"], "no linear layer matches"),
    ]:
        capsys.readouterr()
        assert main(["monarch", str(tiny_dir), *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()


def test_pack_monarch_through_the_format_registry():
    weight = np.random.default_rng(5).standard_normal((32, 16)).astype(np.float32)
    layer = nk.pack(weight, None, "monarch", blocks=2, values="bf16")
    assert isinstance(layer, MonarchLinear) and layer.values_type == "bf16"
    again = nk.from_arrays(*nk.to_arrays(layer))
    np.testing.assert_array_equal(again.to_dense(), layer.to_dense())
    with pytest.raises(NpsparseError, match="no mask"):
        nk.pack(weight, weight > 0, "monarch", blocks=2)
