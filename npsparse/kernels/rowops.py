"""RMSNorm of a few tokens as one compiled call (the decode step's normalisation).

At one token, :func:`npsparse.models.layers.rms_norm` costs six NumPy calls on a vector of a few
hundred floats: 4.8 µs, against 0.7 µs here (SmolLM2, D = 576), or 0.25 ms of every decoded token
over 61 norms. The sum of squares runs in a different order than NumPy's pairwise sum, so results
agree to float32 rounding, not bit for bit; the LLaMA blocks use this only for single-token steps,
so prefill, perplexity and calibration statistics are unchanged. (SwiGLU was tried the same way
and left in NumPy: Numba's scalar ``exp`` made it 4.0 µs against 5.1 µs, not worth a second
numerical path.)
"""

from __future__ import annotations

import numpy as np

from ._numba import jit


@jit
def rms_norm_rows(x, weight, eps):
    """``x / sqrt(mean(x^2) + eps) * weight`` per row; x [T, D] float32, weight [D]."""
    n_rows, dim = x.shape
    out = np.empty_like(x)
    for t in range(n_rows):
        acc = np.float32(0.0)
        for d in range(dim):
            acc += x[t, d] * x[t, d]
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(dim) + np.float32(eps))
        for d in range(dim):
            out[t, d] = (x[t, d] * inv) * weight[d]
    return out
