"""Reparametrisations of a linear layer's weight for training: LoRA, PST and SaRA.

An adapter holds a frozen copy of a weight ``W [N, K]`` and its own small trainable arrays. Each
step it computes the *effective* weight, which the training loop writes into the model's live
array before the forward; the engine then gives ``G = dL/dW_eff`` and :meth:`Adapter.backward`
turns it into the gradients of the adapter's arrays, which an optimizer updates. At the end
:meth:`Adapter.merged` is the weight to save.

- :class:`LoRA` (Hu et al. 2021): ``W_eff = W + (alpha / r) B A``; the baseline SaRA is
  compared with.
- :class:`PST` (Li et al., IJCAI 2022, alibaba/AliceMind ``S4/PST``): a low-rank weight update
  and a low-rank + row/column importance score whose top entries are kept, with a cubic sparsity
  schedule and a straight-through estimator: dense -> sparse while training.
- :class:`SaRA` (Hu et al. 2024, sjtuplayer/SaRA): train only the smallest-magnitude entries of
  the pretrained weight, stored sparse, with a nuclear-norm penalty on their update.

The mask helpers (:func:`top_k_mask`, :func:`nm_ramp_mask`) and :func:`cubic_sparsity` are
cheap enough to run on every matrix at every step (``argpartition``, no full sort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import NpsparseError
from ..prune.patterns import Pattern

# -- schedule and masks ----------------------------------------------------------------------


@dataclass(frozen=True)
class SparsitySchedule:
    """PST's cubic sparsity schedule with its two warm-up phases (AliceMind's defaults).

    For optimizer step ``t`` of ``T`` (0-based, the step whose forward uses the mask):
    ``s = initial`` while ``t <= initial_warmup * T``; ``s = final`` once
    ``t > T - final_warmup * T``; in between ``s = final + (initial - final) (1 - p)^3`` with
    ``p = (t - initial_warmup T) / (T - (initial_warmup + final_warmup) T)``. The reference
    (``schedule_sparsity_ratio`` in ``pst/utils.py``, ``run_glue.py``) uses 10% and 30% of the
    steps and sets the sparsity for the next forward after each optimizer step, as here.

    Parameters
    ----------
    final : float
        Target sparsity ``s_f`` (fraction pruned), ``0 <= s_f < 1``.
    initial : float
        Starting sparsity ``s_i``, ``0 <= s_i <= s_f``.
    initial_warmup, final_warmup : float
        Fractions of the steps spent at ``s_i`` first and at ``s_f`` last; their sum < 1.
    """

    final: float
    initial: float = 0.0
    initial_warmup: float = 0.1
    final_warmup: float = 0.3

    def __post_init__(self):
        if not (math.isfinite(self.final) and 0 <= self.final < 1):
            raise NpsparseError(f"sparsity {self.final} is out of range: it must satisfy "
                                "0 <= s < 1")
        if not (0 <= self.initial <= self.final):
            raise NpsparseError(f"initial sparsity {self.initial} must be between 0 and the "
                                f"final sparsity {self.final}")
        if (self.initial_warmup < 0 or self.final_warmup < 0
                or not self.initial_warmup + self.final_warmup < 1):
            raise NpsparseError(
                f"the sparsity schedule's warm-ups ({self.initial_warmup:g} + "
                f"{self.final_warmup:g} of the run) must be non-negative and leave part of the "
                "run for the cubic ramp (sum < 1)")

    def at(self, step: int, total: int) -> float:
        """Sparsity for optimizer step ``step`` (0-based) of ``total``.

        Parameters
        ----------
        step : int
            0 .. total (``total`` gives the final sparsity, used for the merged weight).
        total : int
            Number of optimizer steps, at least 1.

        Returns
        -------
        float
        """
        return cubic_sparsity(step, total, self.initial, self.final, self.initial_warmup,
                              self.final_warmup)

    def check_fits(self, total: int) -> None:
        """Refuse a run too short for the schedule: its last step must train at ``s_f``.

        Parameters
        ----------
        total : int
            Number of optimizer steps of the run.

        Raises
        ------
        NpsparseError
            If step ``total - 1`` is still before the final sparsity (for the default warm-ups,
            a run of fewer than 4 steps), naming the shortest run that fits.
        """
        if self.at(total - 1, total) == self.final:
            return
        shortest = next(t for t in range(total + 1, 100 * (total + 1))
                        if self.at(t - 1, t) == self.final)
        raise NpsparseError(
            f"the sparsity schedule ({self.initial_warmup:.0%} of the steps at {self.initial:g}, "
            f"a cubic ramp, the last {self.final_warmup:.0%} at {self.final:g}) is longer than "
            f"the run: {total} steps never train at the final sparsity; use at least {shortest}")


def cubic_sparsity(step: int, total: int, initial: float, final: float,
                   initial_warmup: float = 0.1, final_warmup: float = 0.3) -> float:
    """``s(t) = s_f + (s_i - s_f)(1 - p)^3`` between two constant phases (see SparsitySchedule).

    Parameters
    ----------
    step, total : int
        Step ``t`` (0-based) and number of steps ``T``.
    initial, final : float
        ``s_i`` and ``s_f``.
    initial_warmup, final_warmup : float
        Fractions of ``T`` held at ``s_i`` at the start and at ``s_f`` at the end.

    Returns
    -------
    float
        Non-decreasing in ``step`` when ``initial <= final``; ``s_i`` at 0, ``s_f`` at ``T``.
    """
    start = initial_warmup * total
    end = total - final_warmup * total
    if step <= start:
        return initial
    if step > end or step >= total:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def top_k_mask(score: np.ndarray, n_keep: int) -> np.ndarray:
    """Keep the ``n_keep`` highest scores of the whole array, in linear time.

    The same mask as ``lowest_mask(score, score.size - n_keep)`` of
    :mod:`npsparse.prune.patterns` (ties at the cut go to higher flat positions first), found
    with one ``np.partition`` instead of a full sort.

    Parameters
    ----------
    score : np.ndarray
        Any shape, e.g. ``[N, K]``; no NaN.
    n_keep : int
        How many to keep (clipped to ``0 .. score.size``).

    Returns
    -------
    np.ndarray
        Bool of ``score``'s shape, True = kept, exactly ``n_keep`` True.
    """
    flat = np.ravel(score)
    n_keep = min(max(int(n_keep), 0), flat.size)
    if n_keep == 0 or n_keep == flat.size:
        return np.full(score.shape, n_keep > 0, dtype=bool)
    cut = flat.size - n_keep
    threshold = np.partition(flat, cut)[cut]  # the smallest kept score
    keep = flat > threshold
    missing = n_keep - int(np.count_nonzero(keep))
    ties = np.flatnonzero(flat == threshold)  # ascending positions
    keep[ties[len(ties) - missing:]] = True
    return keep.reshape(score.shape)


def nm_ramp_mask(score: np.ndarray, n_prune: int, n: int, m: int) -> np.ndarray:
    """Prune ``n_prune`` entries on the way to an N:M pattern (N pruned of every M along K).

    In every aligned group of ``m`` columns the ``m - n`` highest scores are always kept; of the
    other entries (the ones N:M would prune) the ``n_prune`` lowest scores are pruned. With
    ``n_prune = size * n / m`` this is exactly the N:M mask, so the ramp of the cubic schedule
    ends on the pattern without a jump.

    Parameters
    ----------
    score : np.ndarray
        ``[N, K]``, ``K`` divisible by ``m``.
    n_prune : int
        Entries pruned, ``0 .. size * n / m``.
    n, m : int
        The pattern.

    Returns
    -------
    np.ndarray
        ``[N, K]`` bool, True = kept.
    """
    group_keep = nm_keep(score, n, m)  # [N, K]
    candidates = np.where(group_keep, np.inf, score)  # [N, K]; kept groups' top never pruned
    return top_k_mask(candidates, score.size - n_prune)


def nm_keep(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """The same mask as :func:`npsparse.prune.patterns.nm_mask`, by pairwise comparisons.

    ``nm_mask`` argsorts every group of ``m``; for the small ``m`` of N:M patterns it is much
    faster (about 15x for 2:4 on a SmolLM2 MLP matrix) to count, for each entry, how many of its
    group sort before it (smaller, or equal and to its left, as the stable sort orders them) and
    to prune the entries with fewer than ``n`` before them.

    Parameters
    ----------
    score : np.ndarray
        ``[N, K]``, ``K`` divisible by ``m``.
    n, m : int
        ``n`` pruned of every ``m``.

    Returns
    -------
    np.ndarray
        ``[N, K]`` bool, True = kept; exactly ``m - n`` per group.
    """
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # [N, K/m, m]
    keep = np.empty(groups.shape, dtype=bool)
    for i in range(m):
        before = np.zeros(groups.shape[:2], dtype=np.int32)  # [N, K/m]: sorted before entry i
        for j in range(m):
            if j < i:
                before += groups[:, :, j] <= groups[:, :, i]
            elif j > i:
                before += groups[:, :, j] < groups[:, :, i]
        keep[:, :, i] = before >= n
    return keep.reshape(rows, cols)


# -- adapters --------------------------------------------------------------------------------

class Adapter:
    """A trainable reparametrisation of one weight ``W [N, K]`` (the base class).

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` float32 or float64; copied and frozen.
    """

    method = "adapter"

    def __init__(self, weight: np.ndarray):
        if weight.ndim != 2:
            raise NpsparseError(f"an adapter needs a 2-D weight, got shape {weight.shape}")
        self.base = np.array(weight, order="C", copy=True)  # [N, K], frozen

    def params(self) -> dict[str, np.ndarray]:
        """The trainable arrays by short name (live: an optimizer updates them in place).

        Returns
        -------
        dict of str -> np.ndarray
        """
        raise NotImplementedError

    def effective(self, step: int = 0, total: int = 1) -> np.ndarray:
        """The weight the forward uses at optimizer step ``step`` of ``total``.

        Parameters
        ----------
        step, total : int
            Step (0-based) and number of steps (only PST's schedule reads them).

        Returns
        -------
        np.ndarray
            ``[N, K]``, the base's dtype, a new array.
        """
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of :meth:`params` from ``G = dL/dW_eff`` of the last :meth:`effective`.

        Parameters
        ----------
        grad : np.ndarray
            ``[N, K]``.

        Returns
        -------
        dict of str -> np.ndarray
            One array per name of :meth:`params`, of its shape.
        """
        raise NotImplementedError

    def merged(self) -> np.ndarray:
        """The weight to save after training (for PST: at the final sparsity, exact).

        Returns
        -------
        np.ndarray
            ``[N, K]``.
        """
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """What a resumed run needs besides the frozen weight: by default :meth:`params`.

        Everything else is a function of the weight, the seed and the step (PST's mask is
        recomputed by the next :meth:`effective`).

        Returns
        -------
        dict of str -> np.ndarray
        """
        return self.params()

    def load_state(self, arrays: dict) -> None:
        """Restore what :meth:`state` returned, into an adapter built from the same weight.

        Parameters
        ----------
        arrays : dict of str -> np.ndarray
            By the names of :meth:`state`.
        """
        for key, array in self.params().items():
            array[...] = arrays[key]

    def trainable_count(self) -> int:
        """Number of trainable scalars.

        Returns
        -------
        int
        """
        return int(sum(p.size for p in self.params().values()))


class LoRA(Adapter):
    """``W_eff = W + (alpha / r) B A`` (Hu et al. 2021), ``B [N, r]`` zero, ``A [r, K]`` random.

    ``A`` is drawn uniform in ``+-1/sqrt(K)`` (PyTorch's ``kaiming_uniform_(a=sqrt(5))``, as
    peft initialises it), so the first step moves only ``B``.

    On a pruned weight the mask multiplies the result, ``W_eff = M ⊙ (W + scale B A)``, so the
    zeros stay zero and the merged weight keeps the pattern (the factors then learn only what
    lands on kept entries: ``dL/d(B A) = scale G ⊙ M``).

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]``; copied and frozen.
    rank : int
        ``r >= 1``.
    alpha : float, optional
        Scale numerator (default ``r``: the update is ``B A``).
    keep : np.ndarray, optional
        ``[N, K]`` bool mask of a pruned weight (True = kept).
    rng : np.random.Generator
        Seeded generator for ``A``.
    """

    method = "lora"

    def __init__(self, weight: np.ndarray, rank: int, alpha: float | None = None,
                 keep: np.ndarray | None = None, *, rng: np.random.Generator):
        super().__init__(weight)
        check_rank(rank, weight.shape)
        n, k = weight.shape
        self.keep = keep
        self.scale = (rank if alpha is None else alpha) / rank
        bound = 1.0 / math.sqrt(k)
        self.A = rng.uniform(-bound, bound, (rank, k)).astype(weight.dtype)  # [r, K]
        self.B = np.zeros((n, rank), dtype=weight.dtype)  # [N, r]

    def params(self) -> dict[str, np.ndarray]:
        """``{"A": [r, K], "B": [N, r]}``."""
        return {"A": self.A, "B": self.B}

    def effective(self, step: int = 0, total: int = 1) -> np.ndarray:
        """``W + scale B A``, times the mask if any (the schedule is not used)."""
        out = self.base + self.scale * (self.B @ self.A)  # [N, K]
        if self.keep is not None:
            out *= self.keep
        return out

    def backward(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        """``dA = scale B^T G'``, ``dB = scale G' A^T`` with ``G' = G ⊙ M``."""
        if self.keep is not None:
            grad = grad * self.keep
        return {"A": self.scale * (self.B.T @ grad), "B": self.scale * (grad @ self.A.T)}

    def merged(self) -> np.ndarray:
        """The effective weight."""
        return self.effective()


class PST(Adapter):
    """Parameter-efficient sparse training (Li et al., IJCAI 2022): dense -> sparse.

    ``W' = W + beta U V`` (``U [N, r]`` standard normal, ``V [r, K]`` zero);
    ``S = |W'| + alpha1 A B + alpha2 (R 1^T + 1 C^T)`` (``A`` standard normal; ``B``, ``R``,
    ``C`` zero); ``W_eff = M ⊙ W'`` with ``M`` the top ``1 - s(t)`` of ``S`` over the whole
    matrix (as the reference's ``SparseBinarizer``), or on the way to N:M
    (:func:`nm_ramp_mask`). Only ``U, V, A, B, R, C`` train: ``(2r + 1)(N + K)`` scalars.

    The top-k is a straight-through estimator: ``dL/dS = G ⊙ W'`` (the mask's gradient passed
    as the score's), and ``S`` reads ``|W'|``, so ``W'`` gets ``G ⊙ M`` from the product and
    ``sign(W') ⊙ dL/dS = G ⊙ |W'|`` through the score (PyTorch's ``abs`` backward, sign 0 at 0):
    ``dL/dW' = G ⊙ (M + |W'|)``. The standard-normal initialisations and scales are the
    reference's (``pst/sparse.py``).

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]``; copied and frozen.
    pattern : Pattern
        The final sparsity: unstructured (per matrix) or N:M.
    rank : int
        Rank of both the weight update and the score's low-rank term (default 8).
    alpha1, alpha2, beta : float
        Scales of the low-rank score, the row/column score and the weight update (default 1).
    schedule : SparsitySchedule, optional
        Default: from 0 to the pattern's sparsity with the reference's warm-ups.
    rng : np.random.Generator
        Seeded generator for ``U`` and ``A``.
    """

    method = "pst"

    def __init__(self, weight: np.ndarray, pattern: Pattern, rank: int = 8, *,
                 alpha1: float = 1.0, alpha2: float = 1.0, beta: float = 1.0,
                 schedule: SparsitySchedule | None = None, rng: np.random.Generator):
        super().__init__(weight)
        check_rank(rank, weight.shape)
        pattern.check_width(weight.shape[1])
        n, k = weight.shape
        dtype = weight.dtype
        self.pattern = pattern
        self.schedule = schedule or SparsitySchedule(pattern.sparsity)
        if not math.isclose(self.schedule.final, pattern.sparsity):
            raise NpsparseError(f"the schedule ends at {self.schedule.final}, the pattern at "
                                f"{pattern.sparsity}")
        self.alpha1, self.alpha2, self.beta = alpha1, alpha2, beta
        self.U = rng.standard_normal((n, rank)).astype(dtype)  # [N, r]
        self.V = np.zeros((rank, k), dtype=dtype)  # [r, K]
        self.A = rng.standard_normal((n, rank)).astype(dtype)  # [N, r]
        self.B = np.zeros((rank, k), dtype=dtype)  # [r, K]
        self.R = np.zeros(n, dtype=dtype)  # [N]
        self.C = np.zeros(k, dtype=dtype)  # [K]
        self.mask = np.ones((n, k), dtype=bool)  # [N, K], the last effective()'s

    def params(self) -> dict[str, np.ndarray]:
        """``U [N, r]``, ``V [r, K]``, ``A [N, r]``, ``B [r, K]``, ``R [N]``, ``C [K]``."""
        return {"U": self.U, "V": self.V, "A": self.A, "B": self.B, "R": self.R, "C": self.C}

    def weight(self) -> np.ndarray:
        """``W' = W + beta U V``.

        Returns
        -------
        np.ndarray
            ``[N, K]``.
        """
        return self.base + self.beta * (self.U @ self.V)

    def score(self, weight: np.ndarray) -> np.ndarray:
        """``S = |W'| + alpha1 A B + alpha2 (R 1^T + 1 C^T)``.

        Parameters
        ----------
        weight : np.ndarray
            ``W' [N, K]`` from :meth:`weight`.

        Returns
        -------
        np.ndarray
            ``[N, K]``.
        """
        score = np.abs(weight)
        score += self.alpha1 * (self.A @ self.B)
        score += self.alpha2 * (self.R[:, None] + self.C[None, :])
        return score

    def mask_at(self, score: np.ndarray, sparsity: float) -> np.ndarray:
        """The keep mask of a score at a sparsity on the way to the pattern.

        Parameters
        ----------
        score : np.ndarray
            ``[N, K]``.
        sparsity : float
            Fraction pruned now; ``int(sparsity * size)`` entries are pruned (the reference's
            count), so the pattern's own sparsity gives an exact final mask.

        Returns
        -------
        np.ndarray
            ``[N, K]`` bool, True = kept.
        """
        n_prune = int(sparsity * score.size)
        if self.pattern.structured:
            return nm_ramp_mask(score, n_prune, self.pattern.n, self.pattern.m)
        return top_k_mask(score, score.size - n_prune)

    def effective(self, step: int = 0, total: int = 1) -> np.ndarray:
        """``M ⊙ W'`` with the mask at ``schedule.at(step, total)`` (kept for backward)."""
        weight = self.weight()
        sparsity = self.schedule.at(step, total)
        if sparsity > 0:
            self.mask = self.mask_at(self.score(weight), sparsity)
        else:
            self.mask = np.ones(weight.shape, dtype=bool)
        return weight * self.mask

    def backward(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        """The straight-through gradients (see the class docstring), with the last mask."""
        weight = self.weight()  # [N, K], recomputed: the factors have not changed since
        d_score = grad * weight  # [N, K], straight through the top-k
        d_weight = np.abs(weight)  # [N, K]: G ⊙ M + sign(W') ⊙ d_score = G ⊙ (M + |W'|)
        d_weight += self.mask
        d_weight *= grad
        # (X^T Y)^T for the [r, K] gradients: OpenBLAS is much slower with a transposed skinny
        # left operand than with this layout
        return {
            "U": self.beta * (d_weight @ self.V.T),
            "V": self.beta * (d_weight.T @ self.U).T,
            "A": self.alpha1 * (d_score @ self.B.T),
            "B": self.alpha1 * (d_score.T @ self.A).T,
            "R": self.alpha2 * d_score.sum(axis=1),
            "C": self.alpha2 * d_score.sum(axis=0),
        }

    def final_mask(self) -> np.ndarray:
        """The mask at the final sparsity: exactly the pattern.

        Returns
        -------
        np.ndarray
            ``[N, K]`` bool: ``int(s_f * N * K)`` False (unstructured), or N of every M.
        """
        return self.mask_at(self.score(self.weight()), self.pattern.sparsity)

    def merged(self) -> np.ndarray:
        """``M_final ⊙ W'``: the pruned weight to save."""
        return self.weight() * self.final_mask()


class SaRA(Adapter):
    """Train only the smallest-magnitude entries of a pretrained weight (Hu et al. 2024).

    The entries ``P`` with the smallest ``|w|`` (a fraction ``F`` of the matrix's kept entries:
    a pruned weight's zeros are never selected, so its pattern survives) train as a sparse update
    ``dW``: ``W_eff = W + dW``, stored as flat indices plus values, so an optimizer holds moments
    for the selected entries only. The paper selects by one absolute threshold (``|w| < 2e-3``
    in the reference scripts, for diffusion U-Nets); an LLM's matrices differ in scale, so here
    each matrix selects its own quantile. The per-matrix threshold ``t`` (the largest selected
    ``|w|``) is then fixed, as the reference's is.

    :meth:`reselect` is the reference's progressive step (``update_params`` in its AdamW):
    once, mid-training, the selected entries whose current ``|w + dw|`` has grown past ``t``
    are frozen at their trained values and the rest keep training, with fresh optimizer moments
    (the reference rebuilds its optimizer). Unlike the reference, that step still updates.

    The nuclear-norm penalty ``lambda ||dW ⊙ P||_*`` (:meth:`nuclear_penalty`) keeps the update
    low-rank. The reference applies it to the selected entries' current values
    ``(W + dW) ⊙ P``; here to the update ``dW`` (which is zero outside ``P``), which is what
    "keep the update low-rank" means and is 0 at the start. The reference also selects among
    every parameter (norms, biases); here only the weights that get an adapter.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]``; copied and frozen.
    fraction : float
        ``0 < F < 1``: share of the kept entries that train.
    keep : np.ndarray, optional
        ``[N, K]`` bool mask of a pruned weight (True = kept); default: every entry.
    """

    method = "sara"

    def __init__(self, weight: np.ndarray, fraction: float, keep: np.ndarray | None = None):
        super().__init__(weight)
        check_fraction(fraction)
        magnitude = np.abs(self.base)  # [N, K]
        n_candidates = self.base.size
        if keep is not None:
            magnitude = np.where(keep, magnitude, np.inf)
            n_candidates = int(np.count_nonzero(keep))
        n_select = int(fraction * n_candidates)
        selected = top_k_mask(-magnitude, n_select)  # the n_select smallest |w|
        index_dtype = np.int32 if self.base.size < 2**31 else np.int64
        self.index = np.flatnonzero(selected).astype(index_dtype)  # [P], ascending
        self.threshold = float(magnitude.ravel()[self.index].max()) if n_select else 0.0
        self.delta = np.zeros(len(self.index), dtype=self.base.dtype)  # [P]
        self.frozen = np.zeros(0, dtype=index_dtype)  # entries reselect() moved into the base

    def params(self) -> dict[str, np.ndarray]:
        """``{"delta": [P]}``: the update of the selected entries, flat order."""
        return {"delta": self.delta}

    def state(self) -> dict[str, np.ndarray]:
        """The selection as it is now, ``delta``, and the base's values at the frozen entries."""
        return {"index": self.index, "delta": self.delta, "frozen": self.frozen,
                "frozen_base": self.base.ravel()[self.frozen]}

    def load_state(self, arrays: dict) -> None:
        """Restore the selection (it shrinks at :meth:`reselect`) and the frozen updates."""
        self.index = np.array(arrays["index"], dtype=self.index.dtype)
        self.delta = np.array(arrays["delta"], dtype=self.base.dtype)
        self.frozen = np.array(arrays["frozen"], dtype=self.index.dtype)
        self.base.ravel()[self.frozen] = arrays["frozen_base"]

    def update(self) -> np.ndarray:
        """``dW`` as a dense matrix (zero outside the selection).

        Returns
        -------
        np.ndarray
            ``[N, K]``.
        """
        out = np.zeros(self.base.size, dtype=self.base.dtype)
        out[self.index] = self.delta
        return out.reshape(self.base.shape)

    def effective(self, step: int = 0, total: int = 1) -> np.ndarray:
        """``W + dW`` (the schedule is not used)."""
        out = self.base.copy()
        out.ravel()[self.index] += self.delta
        return out

    def backward(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        """``G`` at the selected entries."""
        return {"delta": np.ravel(grad)[self.index]}

    def merged(self) -> np.ndarray:
        """``W + dW``."""
        return self.effective()

    def nuclear_penalty(self, lam: float) -> tuple[float, np.ndarray]:
        """``lam ||dW||_*`` and its subgradient at the selected entries.

        Parameters
        ----------
        lam : float
            Penalty weight (the reference's ``lambda_rank``, 5e-4 in its scripts).

        Returns
        -------
        (float, np.ndarray)
            The penalty and ``lam (U_r V_r^T)`` at the selected entries ``[P]``, from the thin
            SVD of ``dW`` over its nonzero singular values (0 while ``dW = 0``).
        """
        value, subgradient = nuclear_norm_subgradient(self.update())
        return lam * value, lam * subgradient.ravel()[self.index]

    def reselect(self) -> int:
        """Freeze the selected entries whose ``|w + dw|`` passed the threshold; keep the rest.

        The frozen entries' updates move into the base; the caller restarts the optimizer's
        moments for the new (smaller) ``delta``.

        Returns
        -------
        int
            Entries frozen.
        """
        current = np.abs(self.base.ravel()[self.index] + self.delta)  # [P]
        stay = current <= self.threshold
        frozen = self.index[~stay]
        self.base.ravel()[frozen] += self.delta[~stay]
        self.frozen = np.concatenate([self.frozen, frozen])
        self.index = self.index[stay]
        self.delta = self.delta[stay].copy()
        return int(len(frozen))


def nuclear_norm_subgradient(matrix: np.ndarray, rtol: float = 1e-10) -> tuple[float, np.ndarray]:
    """``||X||_*`` (sum of singular values) and the subgradient ``U_r V_r^T``.

    Parameters
    ----------
    matrix : np.ndarray
        ``X [N, K]``.
    rtol : float
        Singular values below ``rtol * max`` count as zero (their directions get no gradient,
        the minimum-norm subgradient).

    Returns
    -------
    (float, np.ndarray)
        The norm and a ``[N, K]`` subgradient (the gradient where the nonzero singular values
        are distinct and ``X`` has full rank).
    """
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)  # [N, q], [q], [q, K]
    if s.size == 0 or s[0] == 0:
        return 0.0, np.zeros_like(matrix)
    r = int(np.count_nonzero(s > rtol * s[0]))
    return float(s.sum()), u[:, :r] @ vt[:r]


def check_rank(rank: int, shape: tuple[int, int] | None = None) -> None:
    """Refuse a rank below 1 (or above the matrix's smaller side) with one line.

    Parameters
    ----------
    rank : int
    shape : (int, int), optional
        ``[N, K]`` of the weight.
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise NpsparseError(f"--rank must be at least 1, got {rank}")
    if shape is not None and rank > min(shape):
        raise NpsparseError(f"--rank {rank} exceeds the smaller side of a {shape[0]}x{shape[1]} "
                            "weight")


def check_fraction(fraction: float) -> None:
    """Refuse a SaRA fraction outside ``(0, 1)`` with one line.

    Parameters
    ----------
    fraction : float
    """
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction)
            and 0 < fraction < 1):
        raise NpsparseError(f"--fraction must satisfy 0 < F < 1, got {fraction}")
