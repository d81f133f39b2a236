"""Golden masks, effective weights and gradients of PST's sparse layer, from PyTorch autograd.

Not part of the package or the test suite: it imports torch, which npsparse never does. It runs in
the oracle virtual environment (only torch and numpy are needed here):

    python3 -m venv /work/oracle
    /work/oracle/bin/pip install numpy \
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /work/oracle/bin/python tests/oracle/make_pst_golden.py

(from the repository root; it takes about two seconds). It writes tests/data/pst_golden.npz,
read by tests/test_pst_oracle.py.

The layer below is a small, separate PyTorch port of the reference's ``SparseLinear`` with
``pruning_method="pst"`` (alibaba/AliceMind, ``S4/PST/pst/sparse.py``), written from its
definition (Li et al., IJCAI 2022), not from npsparse:

- weight   ``W' = W + beta U V`` (``U [N, r]``, ``V [r, K]``; ``W`` frozen);
- score    ``S = |W'| + alpha1 A B + alpha2 (R 1^T + 1 C^T)`` (``A [N, r]``, ``B [r, K]``,
           ``R [N]``, ``C [K]``);
- mask     ``M``: ``int(numel * s)`` entries of ``S`` with the lowest scores set to 0 (one
           ascending sort over the whole matrix, as the reference's ``SparseBinarizer``);
           its backward passes the incoming gradient to ``S`` unchanged (straight through);
- output   ``y = x (M ⊙ W')^T + b``.

The sparsity ``s`` for step ``t`` of ``T`` is the reference's ``schedule_sparsity_ratio``
(``S4/PST/pst/utils.py``) with its warm-ups of 10% and 30% of the steps, from 0 to the final
sparsity. The reference defines no N:M variant, so every case is unstructured.

Every factor is random and nonzero (the reference starts ``V``, ``B``, ``R``, ``C`` at zero,
which would hide their terms), the scales are not 1, and the script checks that dropping any one
score term changes the mask. Two kinds of loss: ``sum(G ⊙ W_eff)`` for a random upstream ``G``,
and ``0.5 ||x W_eff^T + b - target||^2`` for random ``x [6, K]``, ``b`` and ``target``. Gradients
of ``U, V, A, B, R, C`` (and, for the second loss, of ``W_eff`` itself: ``dweff``) come
from autograd in float64.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "tests" / "data"
torch.set_num_threads(1)

N_ROWS_X = 6  # rows of the linear layer's input in the "linear" cases


# ----------------------------------------------------------------------------- the layer port

class LowestPruned(torch.autograd.Function):
    """0 for the ``int(numel * sparsity)`` lowest scores, 1 elsewhere; gradient straight through."""

    @staticmethod
    def forward(ctx, score, sparsity):
        n_prune = int(score.numel() * sparsity)
        order = torch.argsort(score.flatten())  # ascending
        mask = torch.ones_like(score)
        mask.view(-1)[order[:n_prune]] = 0.0
        return mask

    @staticmethod
    def backward(ctx, grad_mask):
        return grad_mask, None  # the mask's gradient is the score's; none for the sparsity


class PSTLinear(torch.nn.Module):
    """A frozen linear layer ``W [N, K]``, ``b [N]`` with PST's trainable factors."""

    def __init__(self, weight, bias, factors: dict, alpha1: float, alpha2: float, beta: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
        self.factors = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(torch.from_numpy(value.copy()))
             for name, value in factors.items()})
        self.alpha1, self.alpha2, self.beta = alpha1, alpha2, beta
        self.sparsity = 0.0

    def updated_weight(self):
        f = self.factors
        return self.weight + self.beta * (f["U"] @ f["V"])  # [N, K]

    def score(self, weight, terms=("abs", "low_rank", "rows_cols")):
        f = self.factors
        parts = {
            "abs": weight.abs(),
            "low_rank": self.alpha1 * (f["A"] @ f["B"]),
            "rows_cols": self.alpha2 * (f["R"][:, None] + f["C"][None, :]),
        }
        return sum(parts[name] for name in terms)  # [N, K]

    def masked_weight(self):
        weight = self.updated_weight()
        mask = LowestPruned.apply(self.score(weight), self.sparsity)
        return mask, mask * weight

    def forward(self, x):
        _, weff = self.masked_weight()
        return torch.nn.functional.linear(x, weff, self.bias)


def reference_sparsity(step: int, total: int, final: float, initial: float = 0.0,
                       initial_warmup: float = 0.1, final_warmup: float = 0.3) -> float:
    """Cubic ramp from ``initial`` to ``final`` between the two warm-ups, as the reference's."""
    if step <= initial_warmup * total:
        return initial
    if step > total - final_warmup * total:
        return final
    ramp_start = initial_warmup * total
    ramp_steps = total - (initial_warmup + final_warmup) * total
    remaining = 1.0 - (step - ramp_start) / ramp_steps
    return final + (initial - final) * remaining ** 3


# ----------------------------------------------------------------------------- cases

CASES = [  # shape [N, K]; the sparsity is reference_sparsity(step, total, final)
    dict(case="s50_r2_upstream", shape=[24, 40], rank=2, final=0.5, step=10, total=10,
         alpha1=0.7, alpha2=1.3, beta=0.5, loss="upstream", seed=0),
    dict(case="s30_r4_linear", shape=[16, 32], rank=4, final=0.3, step=10, total=10,
         alpha1=2.0, alpha2=0.4, beta=1.5, loss="linear", seed=1),
    dict(case="s50_r4_ramp_upstream", shape=[24, 40], rank=4, final=0.5, step=4, total=10,
         alpha1=1.0, alpha2=0.8, beta=2.0, loss="upstream", seed=2),
    dict(case="s30_r2_ramp_linear", shape=[16, 32], rank=2, final=0.3, step=5, total=10,
         alpha1=0.5, alpha2=2.0, beta=0.75, loss="linear", seed=3),
    dict(case="s0_r2_warmup_upstream", shape=[16, 32], rank=2, final=0.5, step=0, total=10,
         alpha1=1.5, alpha2=0.6, beta=1.0, loss="upstream", seed=4),
]


def random_inputs(spec: dict, rng) -> dict:
    """Base weight, bias and factors, scaled so every score term moves the mask."""
    n, k = spec["shape"]
    r = spec["rank"]
    return {
        "base": rng.standard_normal((n, k)),
        "bias": 0.1 * rng.standard_normal(n),
        "U": rng.standard_normal((n, r)),
        "V": 0.2 * rng.standard_normal((r, k)),
        "A": rng.standard_normal((n, r)),
        "B": 0.3 * rng.standard_normal((r, k)),
        "R": 0.3 * rng.standard_normal(n),
        "C": 0.3 * rng.standard_normal(k),
    }


def check_every_term_matters(layer: PSTLinear, mask) -> None:
    """Dropping any one score term must change the mask (else a case could not catch it)."""
    if layer.sparsity == 0:
        return
    all_terms = ("abs", "low_rank", "rows_cols")
    with torch.no_grad():
        weight = layer.updated_weight()
        for dropped in all_terms:
            kept = tuple(t for t in all_terms if t != dropped)
            other = LowestPruned.apply(layer.score(weight, kept), layer.sparsity)
            assert not torch.equal(other, mask), f"the {dropped} term does not change the mask"


def run_case(spec: dict) -> dict:
    rng = np.random.default_rng(spec["seed"])
    inputs = random_inputs(spec, rng)
    factors = {name: inputs[name] for name in ("U", "V", "A", "B", "R", "C")}
    layer = PSTLinear(inputs["base"], inputs["bias"], factors, spec["alpha1"], spec["alpha2"],
                      spec["beta"])
    layer.sparsity = reference_sparsity(spec["step"], spec["total"], spec["final"])
    mask, weff = layer.masked_weight()
    weff.retain_grad()
    n, k = spec["shape"]
    out = dict(inputs)
    if spec["loss"] == "upstream":
        upstream = rng.standard_normal((n, k))
        loss = (torch.from_numpy(upstream) * weff).sum()
        out["upstream"] = upstream
    else:
        x = rng.standard_normal((N_ROWS_X, k))
        target = rng.standard_normal((N_ROWS_X, n))
        y = torch.nn.functional.linear(torch.from_numpy(x), weff, layer.bias)
        loss = 0.5 * ((y - torch.from_numpy(target)) ** 2).sum()
        out.update(x=x, target=target, y=y.detach().numpy())
    loss.backward()
    check_every_term_matters(layer, mask)
    if spec["loss"] == "linear":  # for "upstream" it is the upstream gradient itself
        out["dweff"] = weff.grad.numpy()
    out.update(sparsity=np.array(layer.sparsity), mask=mask.detach().numpy().astype(bool),
               weff=weff.detach().numpy(), loss=np.array(loss.item()))
    for name, param in layer.factors.items():
        out[f"grad/{name}"] = param.grad.numpy()
    kept = int(out["mask"].sum())
    print(f"{spec['case']}: sparsity {layer.sparsity:.6f}, kept {kept} of {n * k}, "
          f"loss {loss.item():.6f}")
    return out


def versions() -> str:
    return json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
                       "numpy": np.__version__})


def main() -> None:
    out = {"versions": np.array(versions()), "meta": np.array(json.dumps(CASES))}
    for spec in CASES:
        for key, value in run_case(spec).items():
            out[f"{spec['case']}/{key}"] = value
    path = DATA / "pst_golden.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
