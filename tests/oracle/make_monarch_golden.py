"""Golden Monarch projections, products and gradients from a PyTorch port of fly's reference.

Not part of the package or the test suite: it imports torch, which npsparse never does. It runs in
the oracle virtual environment (only torch and numpy are needed here; see make_pst_golden.py):

    /work/oracle/bin/python tests/oracle/make_monarch_golden.py

(from the repository root; about a second). It writes tests/data/monarch_golden.npz, read by
tests/test_monarch_oracle.py.

The functions below are a small, separate PyTorch port of HazyResearch/fly, written from its
definitions (not from npsparse), with plain reshapes/permutes instead of einops:

- ``low_rank_project`` (``src/ops/low_rank.py``): ``U S V^T`` by ``torch.linalg.svd``, keep
  ``rank`` terms, ``U sqrt(S)`` and ``sqrt(S) V^T``.
- ``blockdiag_butterfly_project`` (``src/ops/blockdiag_butterfly_projection.py``): square
  ``n = m * m``, ``M`` read as ``(p k) (r s) -> k r p s``, best rank 1 of each ``[p, s]`` slice;
  ``w1 = Vt: k r 1 s -> r k s``, ``w2 = U: k r s 1 -> k s r``.
- ``blockdiag_butterfly_project_einsum_rank`` (``src/ops/blockdiag_butterfly_einsum.py``):
  ``M [m, n]`` read as ``(l j) (k i) -> k j l i`` with ``k = nblocks1``, ``j = nblocks2``, best
  rank ``rank`` of each slice; ``w1 = Vt: k j r i -> k (r j) i``, ``w2 = U: k j l r -> j l (k r)``.
- ``blockdiag_butterfly_multiply`` (``src/models/layers/blockdiag_butterfly_multiply.py``,
  the reference "version 2"): ``x: b (k p) -> b k p``; ``out1 = einsum(kqp, bkp -> bkq)``;
  ``b k q -> b (k q) -> b (r l) -> b l r``; ``out2 = einsum(lsr, blr -> bsl)``; ``b s l ->
  b (s l)``. Gradients of ``sum(G * out)`` by autograd, float64.

Cases: square rank-1 (``b^2 = n``, fly's square projection) and rectangular/square with
``nblocks1 = nblocks2 = b`` and ``rank = min(N, K) / b^2`` (the einsum projection), including
both orientations of a rectangular weight (``N < K`` and ``N > K``). Weights are random normal
(distinct singular values, so the projection is unique up to the sign of each singular pair).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "tests" / "data"
torch.set_num_threads(1)

# (name, N, K, b, projection): "square" = blockdiag_butterfly_project (rank 1, b * b = N = K),
# "rank" = blockdiag_butterfly_project_einsum_rank with rank min(N, K) / b^2
CASES = [
    ("square16_b4", 16, 16, 4, "square"),
    ("square36_b6", 36, 36, 6, "square"),
    ("square32_b2", 32, 32, 2, "rank"),
    ("square16_b4_rank", 16, 16, 4, "rank"),
    ("wide48x96_b4", 48, 96, 4, "rank"),  # N < K: down_proj-like (576 x 1536 / 12)
    ("tall96x48_b4", 96, 48, 4, "rank"),  # N > K: up/gate-like (1536 x 576 / 16)
    ("kv24x72_b2", 24, 72, 2, "rank"),  # k/v-like (192 x 576 / 8)
    ("tall40x20_b2", 40, 20, 2, "rank"),
]
T_TOKENS = 3


def low_rank_project(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vt = torch.linalg.svd(m)
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def project_square(m: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = m.shape[0]
    k_, r_ = b, n // b  # sizes = (r_, k_) with n = r_ * k_; here both are b
    p_, s_ = n // k_, n // r_
    blocks = m.reshape(p_, k_, r_, s_).permute(1, 2, 0, 3)  # (p k) (r s) -> k r p s
    u, vt = low_rank_project(blocks, 1)  # [k, r, p, 1], [k, r, 1, s]
    w1 = vt[:, :, 0, :].permute(1, 0, 2)  # k r 1 s -> r k s
    w2 = u[:, :, :, 0].permute(0, 2, 1)  # k r s 1 -> k s r
    return w1.contiguous(), w2.contiguous()


def project_rank(m: torch.Tensor, nblocks1: int, nblocks2: int,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = m.shape
    k_, j_ = nblocks1, nblocks2
    l_, i_ = rows // j_, cols // k_
    blocks = m.reshape(l_, j_, k_, i_).permute(2, 1, 0, 3)  # (l j) (k i) -> k j l i
    u, vt = low_rank_project(blocks, rank)  # [k, j, l, r], [k, j, r, i]
    w1 = vt.permute(0, 2, 1, 3).reshape(k_, rank * j_, i_)  # k j r i -> k (r j) i
    w2 = u.permute(1, 2, 0, 3).reshape(j_, l_, k_ * rank)  # k j l r -> j l (k r)
    return w1.contiguous(), w2.contiguous()


def multiply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    batch, n = x.shape
    k_, q_, p_ = w1.shape
    l_, s_, r_ = w2.shape
    assert k_ * p_ == n and l_ * r_ == k_ * q_
    out1 = torch.einsum("kqp,bkp->bkq", w1, x.reshape(batch, k_, p_))
    out1 = out1.reshape(batch, r_, l_).transpose(1, 2)  # b (k q) = b (r l) -> b l r
    out2 = torch.einsum("lsr,blr->bsl", w2, out1)
    return out2.reshape(batch, s_ * l_)


def make_case(name: str, n_rows: int, k_cols: int, b: int, kind: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, k_cols))
    m = torch.from_numpy(weight)
    if kind == "square":
        w1, w2 = project_square(m, b)
    else:
        w1, w2 = project_rank(m, b, b, min(n_rows, k_cols) // (b * b))
    x = torch.from_numpy(rng.standard_normal((T_TOKENS, k_cols))).requires_grad_(True)
    upstream = torch.from_numpy(rng.standard_normal((T_TOKENS, n_rows)))
    f1 = w1.detach().clone().requires_grad_(True)
    f2 = w2.detach().clone().requires_grad_(True)
    y = multiply(x, f1, f2)
    (y * upstream).sum().backward()
    out = {"weight": weight, "w1": w1.numpy(), "w2": w2.numpy(),
           "x": x.detach().numpy(), "upstream": upstream.numpy(), "y": y.detach().numpy(),
           "grad_x": x.grad.numpy(), "grad_w1": f1.grad.numpy(), "grad_w2": f2.grad.numpy()}
    return {f"{name}/{key}": np.ascontiguousarray(value) for key, value in out.items()}


def main() -> None:
    arrays, meta = {}, []
    for seed, (name, n_rows, k_cols, b, kind) in enumerate(CASES):
        arrays.update(make_case(name, n_rows, k_cols, b, kind, seed))
        meta.append({"name": name, "shape": [n_rows, k_cols], "blocks": b, "projection": kind,
                     "seed": seed})
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["versions"] = np.array(json.dumps(versions))
    path = DATA / "monarch_golden.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes): {len(meta)} cases, {versions}")


if __name__ == "__main__":
    main()
