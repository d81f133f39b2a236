"""Small random models for tests that need a model of each architecture but no checkpoint."""

import numpy as np

from npsparse.config import ModelConfig
from npsparse.models import build_model, expected_shapes
from npsparse.train import loss_and_grads

TINY = {
    "llama": dict(arch="llama", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, ffn_dim=48, max_position=128),
    "qwen2": dict(arch="qwen2", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=1,
                  head_dim=8, ffn_dim=48, max_position=128, qkv_bias=True, tie_embeddings=True),
    "gpt2": dict(arch="gpt2", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=4,
                 head_dim=8, ffn_dim=64, max_position=128, qkv_bias=True, activation="gelu_new",
                 tie_embeddings=True),
    "opt": dict(arch="opt", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=4,
                head_dim=8, ffn_dim=64, max_position=128, qkv_bias=True, activation="relu",
                tie_embeddings=True, embed_proj_dim=16),
}


def tiny_config(arch: str, **changes) -> ModelConfig:
    return ModelConfig(**{**TINY[arch], **changes})


def random_weights(config: ModelConfig, seed: int = 0) -> dict:
    """Random float32 weights of the right shapes; norm weights near 1 so activations stay sane."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        scale = 0.2 if len(shape) == 2 else 0.1
        value = rng.normal(0.0, scale, size=shape)
        if "norm" in name and name.endswith("weight") or name.split(".")[-2].startswith("ln_"):
            value = 1.0 + value if name.endswith("weight") else value
        out[name] = value.astype(np.float32)
    return out


def tiny_model(arch: str, seed: int = 0, **changes):
    config = tiny_config(arch, **changes)
    return build_model(config, random_weights(config, seed))


def loss_with_values(student, params: dict, ids, losses, teacher_view):
    """The student's loss as a function of new values for some parameters (finite differences).

    The returned ``loss_at({name: value})`` writes the values into ``params`` (the live arrays),
    runs the loss without gradients, and puts every parameter back, whatever happens.
    """
    def loss_at(values):
        saved = {n: p.copy() for n, p in params.items()}
        for n, value in values.items():
            params[n][...] = value
        try:
            terms, _ = loss_and_grads(student, ids, losses, teacher=teacher_view, trainable=())
            return terms["loss"]
        finally:
            for n, value in saved.items():
                params[n][...] = value
    return loss_at


def check_directional_derivative(loss_at, params: dict, grads: dict, names, rng, eps=1e-6):
    """The analytic derivative of the loss along a random direction in ``names`` equals the
    central difference ``(loss(p + eps d) - loss(p - eps d)) / 2 eps`` to 1e-6 relative."""
    import pytest

    direction = {n: rng.standard_normal(params[n].shape) for n in names}
    plus = loss_at({n: params[n] + eps * d for n, d in direction.items()})
    minus = loss_at({n: params[n] - eps * d for n, d in direction.items()})
    analytic = sum(float(np.sum(grads[n] * d)) for n, d in direction.items())
    assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=1e-6)


def topk_model_and_books():
    """A tiny llama and its top-L attention codebooks (2 subspaces x 4 centroids) fitted on three
    random 24-token windows."""
    from npsparse.sparse_attention import fit_attention_codebooks

    model = tiny_model("llama", seed=1)
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(3, 24))
    books = fit_attention_codebooks(model, windows, n_sub=2, n_centroids=4, seed=5, iters=5)
    return model, books


def products_on_one_and_two_threads(layer, x):
    """``layer(x)`` computed with 1 kernel thread, then with 2 (the count is restored after)."""
    import numba

    from npsparse import kernels

    initial = numba.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            kernels.set_threads(threads)
            results.append(layer(x))
    finally:
        kernels.set_threads(initial)
    return results


def rebuilt_from_read_only_views(layer):
    """``from_arrays`` of read-only views of the layer's own arrays, checked to copy nothing."""
    from npsparse import kernels

    arrays, meta = kernels.to_arrays(layer)
    frozen = {}
    for name, a in arrays.items():
        frozen[name] = a.view()
        frozen[name].flags.writeable = False
    rebuilt = kernels.from_arrays(frozen, meta)
    for name, a in rebuilt.arrays.items():
        assert np.shares_memory(a, arrays[name])
    return rebuilt
