"""DSnoT (Zhang et al., 2024): training-free grow/prune swaps on top of an existing sparse layer.

Each row keeps its number of zeros. The row's signed error ``e_i = sum_j (W_ij - Wc_ij) mu_j`` is
the expected shift of output ``i`` (``W`` dense, ``Wc`` current sparse, ``mu_j`` the per-sequence
sum of input ``j``, averaged over sequences). Each cycle, every still-active row regrows the pruned
weight with the largest ``D_ij / var_j`` of the same sign as ``e_i`` (``D_ij = W_ij mu_j``) and
prunes the kept weight with the lowest Wanda score whose ``D`` has the opposite sign; a row stops
when ``|e_i|`` falls to the threshold, when it runs out of candidates, or (with the sign test) when
a swap would flip the sign of ``e_i``.

For magnitude and Wanda bases ``e_i`` is the reference's ``sum over pruned j of D_ij``. For a
SparseGPT base (real SparseGPT with its reconstruction, not the reference's broken path) the kept
weights were reconstructed, so ``e_i`` also counts their change; a regrown weight takes its
original dense value (``regrow`` chooses another). Measured on synthetic 48 x 64 layers (5 seeds),
regrowing with the value the weight had in SparseGPT's sweep just before it was pruned was not
better. Reconstruction error relative to SparseGPT's, sweep value against dense value: x1.56 vs
x1.57 (50%, input correlation 0.5), x2.79 vs x2.08 (70%, correlation 0.9).

Candidate lists are static, as in the reference: only weights the base method pruned can grow,
only weights it kept can be pruned, each at most once. Every row is vectorised; the loop runs over
cycles (at most ``max_cycles``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NpsparseError
from .patterns import Pattern

GUARDS = ("recon", "mean", "none")


@dataclass(frozen=True)
class DSnoTOptions:
    """DSnoT hyper-parameters; defaults are the reference's (DSnoT main.py, commit 297993f on).

    Attributes
    ----------
    max_cycles : int
        Swap iterations per layer (``--max_cycle_time`` 50).
    threshold : float
        A row stops once ``|e_i| <= threshold`` (``--update_threshold`` 0.1, in units of the
        per-sequence input sum, so it depends on the sequence length).
    pow_of_var : float
        Growth ranking ``D / var**pow`` (``--pow_of_var_regrowing`` 1; 0 = no variance term).
    same_sign : bool
        Unstructured only: refuse a swap that flips the sign of ``e_i``. The reference cannot turn
        this on from its CLI (``--without_same_sign`` parses any value as True), so it is off by
        default. N:M always applies it, as the reference. A row that fails it stops.
    guard : {"recon", "mean", "none"}
        When a candidate swap is applied. ``"recon"`` (npsparse's default): only if it lowers the
        row's reconstruction error ``||(W_i - W'_i) X||^2`` on the calibration inputs, computed
        exactly from ``X^T X``; otherwise the row skips that candidate pair and goes on with the
        next. ``"mean"``: only if it lowers ``|e_i|`` (DSnoT's own objective, the mean output
        shift). ``"none"``: always (the reference), so a swap may overshoot: unstructured without
        the sign test, and in N:M, whose pruned weight is the group's lowest score whatever the
        sign of its ``D``.

        Why ``"recon"`` is the default: ``e_i`` is only the first moment of the output error.
        On SmolLM2 (block 0, Wanda 60%) swaps that lower ``|e_i|`` raised the reconstruction
        error of ``q_proj`` from 11886 to 15907 and of ``k_proj`` from 7642 to 9940 while
        lowering the MLP's by 2-6%, and the model's perplexity got worse (61.55 -> 63.73). On a
        SparseGPT base every mean-guided swap undoes part of SparseGPT's least-squares
        compensation: its error rose in 5 of 7 block-0 matrices and perplexity rose at every
        sparsity. With ``"recon"`` DSnoT can never make a layer's reconstruction error worse;
        on SmolLM2 it improves Wanda at every sparsity (60%: 61.55 -> 52.20; 70%: 371.1 ->
        236.5; ``bench/prune_table.py``, rows in ``bench/results/``).
    """

    max_cycles: int = 50
    threshold: float = 0.1
    pow_of_var: float = 1.0
    same_sign: bool = False
    guard: str = "recon"

    def __post_init__(self):
        if self.guard not in GUARDS:
            raise NpsparseError(f"DSnoT guard must be one of {', '.join(GUARDS)}; "
                                f"got {self.guard!r}")


def dsnot(dense: np.ndarray, weight: np.ndarray, mask: np.ndarray, sq_norm: np.ndarray,
          mu: np.ndarray, variance: np.ndarray, pattern: Pattern,
          options: DSnoTOptions = DSnoTOptions(), init_score: np.ndarray | None = None,
          regrow: np.ndarray | None = None, xtx: np.ndarray | None = None):
    """Improve a sparse layer by swapping mask entries; no weight value is changed.

    Parameters
    ----------
    dense : np.ndarray
        ``[N, K]`` original dense weights: ``e_i`` measures the shift from them.
    weight : np.ndarray
        ``[N, K]`` current sparse weights (the base method's output).
    mask : np.ndarray
        ``[N, K]`` bool, True = kept, the base method's mask.
    sq_norm, mu, variance : np.ndarray
        ``[K]`` input statistics (:class:`InputStats` ``sq_norm``, ``dsnot_sum``, ``variance``).
    pattern : Pattern
        Unstructured (any per-row counts) or N:M (swaps stay inside one M-group).
    options : DSnoTOptions
    init_score : np.ndarray, optional
        ``[N, K]`` score of the base method; N:M prunes the kept weight with the lowest one in the
        grown weight's group (reference). Defaults to the Wanda score.
    regrow : np.ndarray, optional
        ``[N, K]`` value a regrown weight takes; defaults to ``dense``.
    xtx : np.ndarray, optional
        ``[K, K]`` ``sum over tokens of x x^T`` (:attr:`InputStats.xtx`); needed by
        ``guard="recon"``.

    Returns
    -------
    (np.ndarray, np.ndarray, dict)
        New weights ``[N, K]`` float32, new mask, and ``{"swaps": total swaps, "cycles": cycles run,
        "error_before": sum_i |e_i|, "error_after": sum_i |e_i|}``.
    """
    if options.guard == "recon" and xtx is None:
        raise ValueError("DSnoT with guard='recon' needs xtx, the inputs' sum of x x^T")
    n_rows, n_cols = weight.shape
    start_mask = mask
    mask = mask.copy()
    regrow = dense if regrow is None else regrow
    values = np.where(mask, weight, regrow).astype(np.float64)  # what each weight is if kept
    d = values * mu[None, :]  # [N, K] expected contribution D_ij
    error = ((dense.astype(np.float64) - np.where(mask, weight, 0)) * mu[None, :]).sum(axis=1)
    start_error = error.copy()
    # Zero variance (a constant input) would divide by zero: floor it far below every real one.
    safe_var = np.maximum(variance, max(1e-12 * float(np.max(variance)), 1e-30))
    grow_rank = np.where(~mask, d / safe_var[None, :] ** options.pow_of_var, 0.0)  # [N, K]
    grow_list = np.argsort(grow_rank, axis=1, kind="stable")  # negative ... 0 ... positive
    wanda = np.abs(values) * np.sqrt(sq_norm)[None, :]  # [N, K]
    rows = np.arange(n_rows)
    if options.guard == "recon":
        xtx = np.asarray(xtx, dtype=np.float64)
        # Per row, the gradient of ||delta_i X||^2 / 2 is (X^T X) delta_i, delta = W - W'.
        grad = (dense.astype(np.float64) - np.where(mask, weight, 0.0)) @ xtx  # [N, K]
    active = np.ones(n_rows, dtype=bool)
    swaps, cycles = 0, 0
    grow_from = _TwoEnded(grow_list)
    if pattern.structured:
        score = np.where(mask, wanda if init_score is None else init_score, np.inf)
    else:
        prune_from = _TwoEnded(_prune_order(mask, d, wanda))

    for cycles in range(1, options.max_cycles + 1):
        active &= np.abs(error) > options.threshold
        if not active.any():
            cycles -= 1
            break
        grow = grow_from.take(error > 0)  # [N]
        # A valid growth candidate was pruned by the base method (a weight DSnoT pruned is never
        # grown again) and moves e toward 0: D of the same sign as e.
        ok = ~start_mask[rows, grow] & (np.sign(d[rows, grow]) == np.sign(error))
        ok &= grow_from.open
        if pattern.structured:
            prune, valid = _nm_prune_candidate(score, grow, pattern.m)
        else:
            prune = prune_from.take(error < 0)
            # A valid prune candidate was kept by the base method and still is (a regrown weight
            # is never pruned again: the lists are static, as the reference's), and its D has
            # the sign opposite to e.
            valid = start_mask[rows, prune] & mask[rows, prune]
            valid &= (np.sign(d[rows, prune]) == -np.sign(error)) & prune_from.open
        ok &= valid
        new_error = error + d[rows, prune] - d[rows, grow]
        if pattern.structured or options.same_sign:
            ok &= np.sign(new_error) == np.sign(start_error)
        active &= ok
        apply = active  # the guards skip, without stopping the row, a swap that would not help
        if options.guard == "mean":
            apply = active & (np.abs(new_error) < np.abs(error))
        elif options.guard == "recon":
            v_p, v_g = values[rows, prune], values[rows, grow]
            apply = active & (_recon_change(v_p, v_g, prune, grow, grad, xtx) < 0)
            grad[apply] += (v_p[apply, None] * xtx[prune[apply]]
                            - v_g[apply, None] * xtx[grow[apply]])
        mask[rows[apply], prune[apply]] = False
        mask[rows[apply], grow[apply]] = True
        error = np.where(apply, new_error, error)
        swaps += int(apply.sum())
    new_weight = np.where(mask, values, 0.0).astype(np.float32)
    info = {"swaps": swaps, "cycles": cycles, "error_before": float(np.abs(start_error).sum()),
            "error_after": float(np.abs(error).sum())}
    return new_weight, mask, info


class _TwoEnded:
    """Per row, a fixed column order walked from both ends (DSnoT's grow and prune lists): a row
    whose error asks for one sign takes the next column from the high end, else from the low end;
    ``open`` turns False once a row's two ends have crossed."""

    def __init__(self, order: np.ndarray):
        n_rows, n_cols = order.shape
        self.order, self.rows = order, np.arange(n_rows)
        self.lo, self.hi = np.zeros(n_rows, int), np.full(n_rows, n_cols - 1)

    def take(self, from_high: np.ndarray) -> np.ndarray:
        position = np.where(from_high, self.hi, self.lo).clip(0, self.order.shape[1] - 1)
        self.hi = np.where(from_high, self.hi - 1, self.hi)
        self.lo = np.where(from_high, self.lo, self.lo + 1)
        return self.order[self.rows, position]  # [N] one column per row

    @property
    def open(self) -> np.ndarray:
        return self.lo <= self.hi + 1


def _nm_prune_candidate(score: np.ndarray, grow: np.ndarray, m: int):
    """N:M: the kept weight with the lowest base score in the grown weight's M-group, per row,
    and whether there was one. Each candidate is considered once (its score becomes inf), as
    in the reference."""
    rows = np.arange(len(grow))
    cols = ((grow // m) * m)[:, None] + np.arange(m)[None, :]  # [N, M]
    prune = cols[rows, np.argmin(score[rows[:, None], cols], axis=1)]
    valid = np.isfinite(score[rows, prune])
    score[rows, prune] = np.inf
    return prune, valid


def _recon_change(v_p, v_g, prune, grow, grad, xtx) -> np.ndarray:
    """Per row, how much the swap changes ``||delta_i X||^2``: it changes ``delta_i`` by
    ``u = v_prune e_prune - v_grow e_grow``, so the error by ``2 u.grad_i + u^T (X^T X) u``."""
    rows = np.arange(len(prune))
    return (2.0 * (v_p * grad[rows, prune] - v_g * grad[rows, grow])
            + v_p * v_p * xtx[prune, prune] + v_g * v_g * xtx[grow, grow]
            - 2.0 * v_p * v_g * xtx[prune, grow])


def _prune_order(mask: np.ndarray, d: np.ndarray, wanda: np.ndarray) -> np.ndarray:
    """Per row, column order for pruning candidates: kept with D < 0 by ascending Wanda score, then
    everything that is no candidate (pruned, or D == 0), then kept with D > 0 by descending score.
    Both ends therefore hold the least important weights of each sign."""
    group = np.where(mask & (d < 0), 0, np.where(mask & (d > 0), 2, 1))  # [N, K]
    key = np.where(group == 2, -wanda, wanda)
    return np.lexsort((key, group), axis=1)  # sorts by group, then key
