"""Q8_0 (the GGUF's own head format): blocks bit-exact against ``gguf``, both GEMV lowerings and
the batched product equal to the dequantized dense product, packed folders that store and reload
it, and corrupt arrays refused in one line."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npsparse
from npsparse import kernels
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.io.packed import PACKED_FILE
from npsparse.kernels import q8
from npsparse.packing import apply_format, pack_head, pack_model
from npsparse.tokenizer import Tokenizer


def random_q8(seed, n_rows, k_cols, zero_scales=0.0):
    """(values [N, K] int8 over the full range, scales [N, K/32] float16), some scales zero."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-128, 128, size=(n_rows, k_cols), dtype=np.int8)
    scales = (rng.standard_normal((n_rows, k_cols // 32)) * 0.02).astype(np.float16)
    scales[rng.random(scales.shape) < zero_scales] = 0
    return values, scales


def assert_products(layer, x):
    """Every path (both GEMV lowerings or the batched product, and the naive loop) equals
    ``x @ W.T`` of the dequantized weight, to float32 summation-order accuracy."""
    dense = layer.to_dense()
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    tol = 2e-6 * (np.abs(x) @ np.abs(dense).T) + 1e-30
    outputs = [layer.matmul_naive(x)]
    for path in q8.PATHS:
        layer.path = path
        outputs.append(layer(x))
    for y in outputs:
        assert y.shape == expected.shape and y.dtype == np.float32
        assert np.all(np.abs(y - expected) <= tol)


@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(1, 70), blocks=st.integers(1, 24),
       n_tokens=st.sampled_from([1, 1, 2, 5]), zero_scales=st.sampled_from([0.0, 0.3, 1.0]))
def test_products_equal_dequantized_dense(seed, n_rows, blocks, n_tokens, zero_scales):
    values, scales = random_q8(seed, n_rows, 32 * blocks, zero_scales)
    layer = kernels.Q8Linear.from_q8_0(values, scales)
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, 32 * blocks))
    assert_products(layer, x.astype(np.float32))


def test_batched_product_crosses_tiles():
    """More rows than one dequantized tile: every tile lands in its own columns."""
    values, scales = random_q8(3, q8.TILE_ROWS + 37, 64)
    layer = kernels.Q8Linear.from_q8_0(values, scales)
    assert_products(layer, np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32))


@pytest.mark.parametrize("q", [-128, 127, 0])
def test_edge_cases(q):
    """K = 32, N = 1, extreme int8 values, the largest float16 scale, and a zero scale."""
    for scale in (65504.0, 2.0**-24, 0.0):  # float16 max, smallest subnormal, zero
        layer = kernels.Q8Linear.from_q8_0(np.full((1, 32), q, np.int8),
                                           np.full((1, 1), scale, np.float16))
        x = np.ones((1, 32), np.float32)
        want = np.float32(32 * q * scale)
        assert layer.nnz == (32 if q and scale else 0)
        for path in q8.PATHS:
            layer.path = path
            assert layer(x)[0, 0] == want
        assert layer.matmul_naive(x)[0, 0] == want


def test_quantize_matches_gguf_bit_exact():
    """The lossy quantizer is the reference rule: the same bytes as ``gguf.quants.quantize``,
    zero blocks, ties and a block with one huge value included."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 96)).astype(np.float32)
    weight[0] = 0.0
    weight[1, :32] = np.arange(32) - 15.5  # ties at .5 after scaling
    weight[2, 5] = 1e4
    values, scales = q8.quantize_q8_0(weight)
    want_values, want_scales = q8.q8_0_from_blocks(
        quantize(weight, GGMLQuantizationType.Q8_0), weight.shape)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(scales.view(np.uint16), want_scales.view(np.uint16))
    again = q8.quantize_q8_0(q8.dequantize_q8_0(values, scales))  # Q8_0 values re-quantize
    np.testing.assert_array_equal(again[0], values)                # to themselves
    np.testing.assert_array_equal(again[1].view(np.uint16), scales.view(np.uint16))


def test_gguf_blocks_are_the_files_values(smollm2_path):
    """SmolLM2's tied head stays the file's Q8_0 blocks: dequantized, exactly gguf's values."""
    from gguf.quants import dequantize

    checkpoint = open_checkpoint(smollm2_path)
    values, scales = checkpoint.q8_0_blocks("model.embed_tokens.weight")
    tensor = checkpoint._tensors["model.embed_tokens.weight"]
    want = dequantize(tensor.data, tensor.tensor_type).reshape(values.shape)
    np.testing.assert_array_equal(q8.dequantize_q8_0(values, scales), want)
    assert checkpoint.q8_0_blocks("model.layers.0.mlp.up_proj.weight") is None  # Q4_1


def test_k_not_a_multiple_of_32_is_one_line():
    for call in (lambda: kernels.pack(np.ones((2, 48), np.float32), None, "q8_0"),
                 lambda: kernels.Q8Linear.from_q8_0(np.ones((2, 48), np.int8),
                                                    np.ones((2, 1), np.float16))):
        with pytest.raises(NpsparseError, match="multiple of 32, got K = 48") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "scales": a["scales"].astype(np.float32)}, "'scales' must be 2-D float16"),
    (lambda a: {**a, "values": a["values"].astype(np.int16)}, "'values' must be 2-D int8"),
    (lambda a: {**a, "scales": a["scales"][:, :1].copy()}, "'scales' has shape"),
    (lambda a: {**a, "scales": np.where(np.arange(2) == 1, np.float16(np.nan), a["scales"])},
     "NaN or infinite"),
    (lambda a: {"values": a["values"]}, "needs array 'scales'"),
])
def test_corrupt_arrays_are_refused(change, message):
    arrays, metadata = kernels.to_arrays(kernels.Q8Linear.from_q8_0(*random_q8(0, 3, 64)))
    with pytest.raises(NpsparseError, match=message) as err:
        kernels.from_arrays(change(arrays), metadata)
    assert "\n" not in str(err.value)


# ---- the head of a model, and packed folders ----------------------------------------------------

@pytest.fixture(scope="module")
def tied_q8_dir(tmp_path_factory, smollm2_path):
    """A tiny tied-embedding LLaMA whose embedding holds Q8_0 values (as SmolLM2's does)."""
    from helpers import random_weights, tiny_config

    from npsparse.models import build_model

    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, tie_embeddings=True)
    weights = random_weights(config)
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = q8.dequantize_q8_0(*q8.quantize_q8_0(embed))
    model = build_model(config, weights)
    out = tmp_path_factory.mktemp("tied") / "model"
    write_hf_dir(out, config, model.state_dict(), tokenizer_json=tokenizer.to_json())
    return out


def test_auto_head_is_q8_0_only_where_lossless(tied_q8_dir):
    llm = npsparse.load(tied_q8_dir)
    info = apply_format(llm.model, "bf16")  # head="auto"
    assert info["head"] == "Q8Linear"
    np.testing.assert_array_equal(llm.model.head.to_dense(), llm.model.embed_tokens)
    from helpers import tiny_model

    random_model = tiny_model("llama", tie_embeddings=True)  # values Q8_0 cannot hold
    assert type(pack_head(random_model, "auto")).__name__ == "BF16Linear"
    lossy = pack_head(random_model, "q8_0")  # opt-in: quantized per 32
    assert type(lossy).__name__ == "Q8Linear"
    err = np.abs(lossy.to_dense() - random_model.head.to_dense()).max()
    assert 0 < err <= np.abs(random_model.head.to_dense()).max() / 127


def test_packed_folder_stores_and_reloads_the_q8_0_head(tied_q8_dir, tmp_path):
    report = pack_model(tied_q8_dir, tmp_path / "packed", "bf16")
    assert report["head"] == "Q8Linear"
    expected = npsparse.load(tied_q8_dir)
    apply_format(expected.model, "bf16")
    loaded = npsparse.load(tmp_path / "packed")
    assert isinstance(loaded.model.head, kernels.Q8Linear)
    for key, array in loaded.model.head.arrays.items():
        np.testing.assert_array_equal(array, expected.model.head.arrays[key])
    # the embedding is not stored twice: it comes back from the head's blocks, exactly
    np.testing.assert_array_equal(loaded.model.embed_tokens, expected.model.embed_tokens)
    ids = loaded.encode("def area(r):\n    return 3.14159 * r ** 2")
    np.testing.assert_array_equal(loaded.logits(ids), expected.logits(ids))
    assert loaded.model.weight_bytes() == expected.model.weight_bytes()


def test_packed_folder_with_a_corrupt_scale_is_refused(tied_q8_dir, tmp_path):
    folder = tmp_path / "packed"
    pack_model(tied_q8_dir, folder, "bf16")
    from npsparse.io.hf_dir import SafetensorsFile

    handle = SafetensorsFile(folder / PACKED_FILE, raw=True)
    name = "lm_head.weight::scales"
    begin = handle.data_start + handle.entries[name]["data_offsets"][0]
    data = bytearray((folder / PACKED_FILE).read_bytes())
    data[begin:begin + 2] = np.array([np.inf], np.float16).tobytes()
    del handle
    (folder / PACKED_FILE).write_bytes(bytes(data))
    with pytest.raises(NpsparseError, match="lm_head.weight: q8_0 array 'scales' holds NaN") as err:
        npsparse.load(folder)
    assert "\n" not in str(err.value)
