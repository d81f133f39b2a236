"""PESC routing against PyTorch autograd (golden data from tests/oracle/make_routing_golden.py).

The oracle is a separate PyTorch port of PESC's routed adapters written from the equations (top-k
router over the FFN's input, softmax over the chosen logits, exact-GELU adapters on the FFN's
output, each chosen expert's weights gathered per token and slot). In float64, for k < E, k == E,
one token and an expert that no token chooses: the chosen experts (exactly), the gates, the
output, the gradients of ``sum(G * y)`` with respect to ``h, F, Wr, D, U``, and the
Switch-Transformer balance loss with its gradients, each to 1e-10 of its largest entry.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from npsparse.routing import (balance_loss, balance_loss_backward, pesc_backward, pesc_forward,
                              route)

GOLDEN = np.load(Path(__file__).parent / "data" / "routing_golden.npz")
CASES = {spec["case"]: spec for spec in json.loads(str(GOLDEN["meta"]))}
RTOL = 1e-10


def golden(case: str) -> dict:
    prefix = f"{case}/"
    return {key[len(prefix):]: GOLDEN[key] for key in GOLDEN.files if key.startswith(prefix)}


def assert_close(got: np.ndarray, want: np.ndarray, what: str, floor: float = 0.0) -> None:
    """Within RTOL of the largest entry of ``want``, or of ``floor`` when that is larger."""
    assert got.shape == want.shape, what
    error = float(np.max(np.abs(got - want)))
    scale = max(float(np.max(np.abs(want))), floor)
    assert error <= RTOL * scale, f"{what}: max error {error:.3g}, largest entry {scale:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_pesc_output_and_gradients_equal_pytorch_autograd(case):
    spec, data = CASES[case], golden(case)
    tape = {}
    y = pesc_forward(data["h"], data["f"], data["router"], data["down"], data["up"], spec["k"],
                     spec["scale"], tape)
    assert tape["chosen"].dtype == np.int64
    np.testing.assert_array_equal(tape["chosen"], data["chosen"])
    assert_close(tape["logits"], data["logits"], "logits")
    assert_close(tape["gates"], data["gates"], "gates")
    assert_close(y, data["y"], "y")

    d_h, d_f, grads = pesc_backward(data["upstream"], tape)
    assert sorted(grads) == ["down", "router", "up"]
    assert_close(d_h, data["grad/h"], "dL/dh")
    assert_close(d_f, data["grad/f"], "dL/dF")
    for name in ("router", "down", "up"):
        assert_close(grads[name], data[f"grad/{name}"], f"dL/d{name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_balance_loss_and_gradients_equal_pytorch_autograd(case):
    spec, data = CASES[case], golden(case)
    logits = data["h"] @ data["router"].T  # [T, E]
    chosen, _ = route(logits, spec["k"])
    loss = balance_loss(logits, chosen, spec["alpha"])
    assert loss == pytest.approx(float(data["balance"]), rel=RTOL, abs=0)
    # transformers' fixed load_balancing_loss_func sums f over the k slots: k times ours
    assert loss / spec["alpha"] * spec["k"] == pytest.approx(
        float(data["balance_transformers"]), rel=RTOL, abs=0)

    d_logits = balance_loss_backward(logits, chosen, spec["alpha"])
    # with k == E every f_i is 1/E, the loss is alpha whatever the logits and both gradients are
    # rounding noise (~1e-17): measure them against alpha, the loss's own size
    floor = spec["alpha"]
    if spec["k"] == spec["experts"]:
        assert np.max(np.abs(d_logits)) < 1e-15 * spec["alpha"] * spec["experts"]
    assert_close(d_logits, data["balance_grad/logits"], "d balance / d logits", floor)
    tape = {}
    pesc_forward(data["h"], data["f"], data["router"], data["down"], data["up"], spec["k"],
                 spec["scale"], tape)
    d_h, _, grads = pesc_backward(np.zeros_like(data["f"]), tape, d_logits=d_logits)
    assert_close(grads["router"], data["balance_grad/router"], "d balance / d router", floor)
    assert_close(d_h, data["balance_grad/h"], "d balance / dh", floor)


def test_the_cases_cover_k_equal_to_e_one_token_and_an_idle_expert():
    shapes = set()
    for case, spec in CASES.items():
        data = golden(case)
        used = np.unique(data["chosen"])
        shapes.add("k == E" if spec["k"] == spec["experts"] else "k < E")
        shapes.add("one token" if spec["tokens"] == 1 else "many tokens")
        if used.size < spec["experts"]:
            shapes.add("idle expert")
    assert shapes == {"k == E", "k < E", "one token", "many tokens", "idle expert"}
