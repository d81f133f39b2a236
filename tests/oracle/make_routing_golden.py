"""Golden outputs and gradients of PESC's routed adapters, from PyTorch autograd.

Not part of the package or the test suite: it imports torch, which npsparse never does. It runs in
the oracle virtual environment (only torch and numpy are needed here):

    python3 -m venv /work/oracle
    /work/oracle/bin/pip install numpy \
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /work/oracle/bin/python tests/oracle/make_routing_golden.py

(from the repository root; it takes about two seconds). It writes tests/data/routing_golden.npz,
read by tests/test_routing_oracle.py.

The layer below is a small, separate PyTorch port written from PESC's equations (Wu et al. 2024;
the adapter's activation is ``nn.GELU()``, the exact GELU, as in ``ParallelAdapterMLP`` of
wuhy68/Parameter-Efficient-MoE ``camelidae/modeling_camelidae.py``), not from npsparse:

- logits   ``z = h Wr^T`` (``h [T, D]`` the FFN's input, ``Wr [E, D]``);
- choice   ``torch.topk(z, k)``: the k largest logits per token, by decreasing logit;
- gates    ``g = softmax`` over the k chosen logits;
- output   ``y = sum_j g_j (F + s U_e gelu(D_e F))`` slot by slot (``F [T, D]`` the frozen FFN's
           output, ``D [E, R, D]``, ``U [E, D, R]``), with every chosen expert's weights gathered
           per (token, slot), so no grouping by expert is involved;
- balance  the Switch-Transformer loss ``alpha E sum_i f_i P_i``, ``f_i`` the fraction of the
           ``T k`` (token, slot) pairs routed to expert i (no gradient), ``P_i`` the mean over
           tokens of the softmax over all E logits. Also recorded: the same routing scored as
           transformers' fixed ``load_balancing_loss_func`` does (a one-hot ``[T, k, E]`` mask
           averaged over tokens, summed over slots and experts against ``P``, times E), which
           is k times ours.

Every input is random and nonzero (PESC starts ``U`` at zero, which would hide the adapters'
gradients), with ``s`` not 1. Per case, in float64: ``y``, the chosen experts, the gates, the
autograd gradients of ``sum(G * y)`` for a random ``G`` with respect to ``h, F, Wr, D, U``
(``grad/*``), the balance loss and its gradients with respect to the logits, ``Wr`` and ``h``
(``balance_grad/*``). The cases cover k == E, a single token, k == 1 and an expert that no token
chooses (checked here).
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


# ----------------------------------------------------------------------------- the port


def pesc_output(h, f, router, down, up, k: int, scale: float):
    """y [T, D], chosen [T, k], gates [T, k], logits [T, E] of the routed adapters."""
    logits = h @ router.T  # [T, E]
    top_logits, chosen = torch.topk(logits, k, dim=-1)  # [T, k] each
    gates = torch.softmax(top_logits, dim=-1)  # [T, k]
    down_chosen = down[chosen]  # [T, k, R, D]
    up_chosen = up[chosen]  # [T, k, D, R]
    hidden = torch.einsum("tkrd,td->tkr", down_chosen, f)  # [T, k, R]
    adapter = torch.einsum("tkdr,tkr->tkd", up_chosen, torch.nn.functional.gelu(hidden))
    per_slot = f[:, None, :] + scale * adapter  # [T, k, D]
    y = (gates[:, :, None] * per_slot).sum(dim=1)  # [T, D]
    return y, chosen, gates, logits


def switch_balance(logits, chosen, alpha: float):
    """alpha * E * sum_i f_i P_i, f over the T*k routed pairs, P the mean full softmax."""
    n_experts = logits.shape[1]
    routed = torch.nn.functional.one_hot(chosen.reshape(-1), n_experts).to(logits.dtype)
    fraction = routed.mean(dim=0)  # [E], a constant: one_hot has no gradient
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=0)  # [E]
    return alpha * n_experts * (fraction * mean_probs).sum()


def transformers_style_balance(logits, chosen):
    """The routing scored as transformers' fixed loss (no alpha): slots summed, not averaged."""
    n_experts = logits.shape[1]
    mask = torch.nn.functional.one_hot(chosen, n_experts).to(logits.dtype)  # [T, k, E]
    per_slot_fraction = mask.mean(dim=0)  # [k, E]
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=0)  # [E]
    return (per_slot_fraction * mean_probs[None, :]).sum() * n_experts


# ----------------------------------------------------------------------------- cases

CASES = [
    dict(case="t10_e4_k2", tokens=10, dim=10, experts=4, rank=3, k=2, scale=0.25, alpha=0.01,
         seed=0),
    dict(case="t6_e3_k3_all", tokens=6, dim=8, experts=3, rank=2, k=3, scale=1.0, alpha=0.5,
         seed=1),
    dict(case="t1_e4_k2_one_token", tokens=1, dim=8, experts=4, rank=4, k=2, scale=0.5,
         alpha=0.1, seed=2),
    dict(case="t5_e8_k1_idle", tokens=5, dim=8, experts=8, rank=3, k=1, scale=2.0, alpha=0.02,
         seed=3),
]


def random_inputs(spec: dict, rng) -> dict:
    t, d, e, r = spec["tokens"], spec["dim"], spec["experts"], spec["rank"]
    return {
        "h": rng.standard_normal((t, d)),
        "f": rng.standard_normal((t, d)),
        "router": rng.standard_normal((e, d)),
        "down": 0.5 * rng.standard_normal((e, r, d)),
        "up": 0.5 * rng.standard_normal((e, d, r)),
        "upstream": rng.standard_normal((t, d)),
    }


def smallest_topk_gap(logits: np.ndarray, k: int) -> float:
    if k == logits.shape[1]:
        return float("inf")
    ordered = -np.sort(-logits, axis=1)
    return float(np.min(ordered[:, k - 1] - ordered[:, k]))


def run_case(spec: dict) -> dict:
    rng = np.random.default_rng(spec["seed"])
    inputs = random_inputs(spec, rng)
    names = ("h", "f", "router", "down", "up")
    leaves = {n: torch.tensor(inputs[n], dtype=torch.float64, requires_grad=True) for n in names}
    y, chosen, gates, logits = pesc_output(*(leaves[n] for n in names), spec["k"], spec["scale"])
    (torch.from_numpy(inputs["upstream"]) * y).sum().backward()
    out = dict(inputs, y=y.detach().numpy(), chosen=chosen.numpy().astype(np.int64),
               gates=gates.detach().numpy(), logits=logits.detach().numpy())
    for n in names:
        out[f"grad/{n}"] = leaves[n].grad.numpy().copy()

    # the balance loss alone, with fresh leaves so its gradients are not mixed with the above
    h = torch.tensor(inputs["h"], dtype=torch.float64, requires_grad=True)
    router = torch.tensor(inputs["router"], dtype=torch.float64, requires_grad=True)
    balance_logits = h @ router.T  # [T, E]
    balance_logits.retain_grad()
    balance = switch_balance(balance_logits, chosen, spec["alpha"])
    balance.backward()
    out.update({"balance": np.array(balance.item()),
                "balance_transformers": np.array(
                    transformers_style_balance(balance_logits.detach(), chosen).item()),
                "balance_grad/logits": balance_logits.grad.numpy().copy(),
                "balance_grad/router": router.grad.numpy().copy(),
                "balance_grad/h": h.grad.numpy().copy()})

    gap = smallest_topk_gap(out["logits"], spec["k"])
    assert gap > 1e-6, f"{spec['case']}: a near tie at the top-k boundary ({gap})"
    idle = sorted(set(range(spec["experts"])) - set(out["chosen"].reshape(-1).tolist()))
    if spec["case"].endswith("_idle"):
        assert idle, f"{spec['case']}: every expert got a token"
    print(f"{spec['case']}: top-k gap {gap:.3g}, idle experts {idle}, "
          f"balance {balance.item():.6f} (alpha {spec['alpha']})")
    return out


def versions() -> str:
    return json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
                       "numpy": np.__version__})


def main() -> None:
    out = {"versions": np.array(versions()), "meta": np.array(json.dumps(CASES))}
    for spec in CASES:
        for key, value in run_case(spec).items():
            out[f"{spec['case']}/{key}"] = value
    path = DATA / "routing_golden.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
