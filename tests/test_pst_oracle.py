"""PST against PyTorch autograd (golden data from tests/oracle/make_pst_golden.py).

The oracle is a separate PyTorch port of the reference's sparse linear layer (AliceMind's
``S4/PST/pst/sparse.py``: ``SparseBinarizer`` and ``SparseLinear``) with its sparsity schedule.
In float64, for unstructured sparsities at the end, in the middle and before the ramp: the
schedule's sparsity, the mask (exactly), the effective weight and the gradients of ``U, V, A,
B, R, C`` through the straight-through top-k, each to 1e-10 of its largest entry. The reference
has no N:M variant, so there is nothing to compare npsparse's N:M ramp with.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from npsparse.prune.patterns import Pattern
from npsparse.train.adapters import PST

GOLDEN = np.load(Path(__file__).parent / "data" / "pst_golden.npz")
CASES = {spec["case"]: spec for spec in json.loads(str(GOLDEN["meta"]))}
FACTORS = ("U", "V", "A", "B", "R", "C")
RTOL = 1e-10


def golden(case: str) -> dict:
    prefix = f"{case}/"
    return {key[len(prefix):]: GOLDEN[key] for key in GOLDEN.files if key.startswith(prefix)}


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    error = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    assert error <= RTOL * scale, f"{what}: max error {error:.3g}, largest entry {scale:.3g}"


def adapter_like_the_oracle(spec: dict, data: dict) -> PST:
    adapter = PST(data["base"], Pattern(spec["final"]), spec["rank"], alpha1=spec["alpha1"],
                  alpha2=spec["alpha2"], beta=spec["beta"], rng=np.random.default_rng(0))
    for name in FACTORS:
        setattr(adapter, name, data[name].copy())
    return adapter


@pytest.mark.parametrize("case", sorted(CASES))
def test_pst_mask_weight_and_gradients_equal_pytorch_autograd(case):
    spec, data = CASES[case], golden(case)
    adapter = adapter_like_the_oracle(spec, data)
    assert adapter.schedule.at(spec["step"], spec["total"]) == pytest.approx(
        float(data["sparsity"]), rel=1e-12, abs=0)

    weff = adapter.effective(spec["step"], spec["total"])  # [N, K]
    assert adapter.mask.dtype == bool
    assert adapter.mask.sum() == data["mask"].sum()
    np.testing.assert_array_equal(adapter.mask, data["mask"])
    assert_close(weff, data["weff"], "W_eff")

    if spec["loss"] == "upstream":
        upstream = data["upstream"]  # [N, K], dL/dW_eff of sum(G * W_eff)
    else:
        y = data["x"] @ weff.T + data["bias"]  # [T, N]
        assert_close(y, data["y"], "y")
        upstream = (y - data["target"]).T @ data["x"]  # [N, K], of 0.5 ||y - target||^2
        assert_close(upstream, data["dweff"], "dL/dW_eff")
    grads = adapter.backward(upstream)
    assert sorted(grads) == sorted(FACTORS)
    for name in FACTORS:
        assert_close(grads[name], data[f"grad/{name}"], f"dL/d{name}")


def test_every_case_prunes_what_the_reference_prunes():
    # int(numel * s) entries pruned, and the cases span the schedule's three phases
    phases = set()
    for case, spec in CASES.items():
        data = golden(case)
        n_prune = int(float(data["sparsity"]) * data["mask"].size)
        assert int((~data["mask"]).sum()) == n_prune, case
        phases.add("before" if n_prune == 0 else
                   "final" if float(data["sparsity"]) == spec["final"] else "ramp")
    assert phases == {"before", "ramp", "final"}
