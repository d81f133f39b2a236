"""Monarch projection, product and backward against a PyTorch port of fly's reference code.

The golden file is made by ``tests/oracle/make_monarch_golden.py`` (fly's
``blockdiag_butterfly_project``, ``blockdiag_butterfly_project_einsum_rank`` and
``blockdiag_butterfly_multiply`` with autograd, float64). fly's ``w1`` is npsparse's ``right``
and its ``w2`` is ``left``: same shapes, same layout. Singular vectors are unique only up to the
sign of each (u, v) pair, so factors are compared in absolute value and the projected matrix
itself exactly.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from npsparse.monarch import monarch_backward, monarch_dense, monarch_forward, project_factors

DATA = Path(__file__).parent / "data"
GOLDEN = np.load(DATA / "monarch_golden.npz")
CASES = json.loads(str(GOLDEN["meta"]))


def case(name: str) -> dict:
    return {key.split("/", 1)[1]: GOLDEN[key] for key in GOLDEN.files
            if key.startswith(name + "/")}


@pytest.mark.parametrize("meta", CASES, ids=[c["name"] for c in CASES])
def test_projection_matches_fly(meta):
    g = case(meta["name"])
    right, left = project_factors(g["weight"], meta["blocks"])
    assert right.shape == g["w1"].shape and left.shape == g["w2"].shape
    np.testing.assert_allclose(np.abs(right), np.abs(g["w1"]), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.abs(left), np.abs(g["w2"]), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(monarch_dense(right, left), monarch_dense(g["w1"], g["w2"]),
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("meta", CASES, ids=[c["name"] for c in CASES])
def test_product_and_backward_match_fly(meta):
    g = case(meta["name"])
    y, middle = monarch_forward(g["x"], g["w1"], g["w2"])
    np.testing.assert_allclose(y, g["y"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["x"] @ monarch_dense(g["w1"], g["w2"]).T, g["y"], rtol=1e-12,
                               atol=1e-12)
    d_x, d_right, d_left = monarch_backward(g["upstream"], g["x"], g["w1"], g["w2"], middle)
    np.testing.assert_allclose(d_x, g["grad_x"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_right, g["grad_w1"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_left, g["grad_w2"], rtol=1e-12, atol=1e-12)
