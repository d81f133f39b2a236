"""Training losses and their gradients: cross-entropy and KL through the output head, SquareHead.

The head's logits ``[T, V]`` (V = 49152 for SmolLM2) are the largest activation of a step, so
:func:`head_losses` computes them, their softmax and their gradient a chunk of tokens at a time
and keeps none of them: peak memory is one ``[chunk, V]`` block, not ``[T, V]`` twice.
Chunking over tokens rather than over the vocabulary gives the same saving with one pass (each
token's softmax sees its whole row) and the same numbers.
"""

from __future__ import annotations

import numpy as np

from ..errors import NpsparseError


def _softmax_and_log(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the last axis and its log, with one ``exp`` pass. x [c, V] -> two [c, V]."""
    shifted = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    total = probs.sum(axis=-1, keepdims=True)
    probs /= total
    shifted -= np.log(total)
    return probs, shifted


def head_losses(h: np.ndarray, head: np.ndarray, targets: np.ndarray, *, ce: float = 1.0,
                kd: float = 0.0, temperature: float = 1.0, teacher_h: np.ndarray | None = None,
                teacher_head: np.ndarray | None = None, head_grad: bool = False,
                chunk: int = 128) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Cross-entropy and/or KL to a teacher through the output head, with gradients.

    Predictions are rows ``0 .. n-1`` of ``h`` with ``n = len(targets)`` (next-token targets);
    later rows get no loss and a zero gradient. Both terms are means over the ``n`` predictions:
    ``ce = -mean log p_s(target)``, ``kd = temperature^2 * mean KL(p_t || p_s)`` with
    ``p = softmax(logits / temperature)`` (Hinton et al.'s scaling, so the gradient's size does
    not depend on the temperature).

    Parameters
    ----------
    h : np.ndarray
        ``[T, D]`` student hidden states after the final norm.
    head : np.ndarray
        ``[V, D]`` the student's output head (the embedding matrix when tied).
    targets : np.ndarray
        ``[n]`` int token ids, ``n <= T``.
    ce, kd : float
        Weights of the two terms (a zero weight skips the term).
    temperature : float
        Softening of the KL term.
    teacher_h, teacher_head : np.ndarray, optional
        ``[T, D]`` and ``[V, D]``, the teacher's; needed when ``kd > 0``.
    head_grad : bool
        Also return the gradient with respect to ``head``.
    chunk : int
        Tokens per block of logits.

    Returns
    -------
    (dict, np.ndarray, np.ndarray or None)
        ``{"ce": float, "kd": float}`` (the unweighted terms that were computed), ``d_h [T, D]``
        of the weighted sum, and ``d_head [V, D]`` (None unless ``head_grad``).
    """
    n = len(targets)
    if n < 1 or n > h.shape[0]:
        raise NpsparseError(f"{n} targets for {h.shape[0]} hidden states")
    if kd and (teacher_h is None or teacher_head is None):
        raise NpsparseError("the KL term needs the teacher's hidden states and head")
    terms = {name: 0.0 for name, weight in (("ce", ce), ("kd", kd)) if weight}
    d_h = np.zeros_like(h)
    d_head = np.zeros_like(head) if head_grad else None
    for lo in range(0, n, chunk):
        rows = slice(lo, min(lo + chunk, n))
        logits = h[rows] @ head.T  # [c, V]
        d_logits = np.zeros_like(logits)
        picks = (np.arange(logits.shape[0]), targets[rows])
        if ce:
            probs, logp = _softmax_and_log(logits)  # [c, V] each
            terms["ce"] -= float(np.sum(logp[picks], dtype=np.float64)) / n
            probs[picks] -= 1.0  # d CE / d logits = softmax - one-hot
            d_logits += (ce / n) * probs
        if kd:
            t_p, t_logp = _softmax_and_log((teacher_h[rows] @ teacher_head.T) / temperature)
            s_p, s_logp = _softmax_and_log(logits / temperature)
            kl = np.sum(t_p * (t_logp - s_logp), dtype=np.float64)
            terms["kd"] += temperature**2 * float(kl) / n
            d_logits += (kd * temperature / n) * (s_p - t_p)
        d_h[rows] = d_logits @ head  # [c, D]
        if head_grad:
            d_head += d_logits.T @ h[rows]  # [V, D]
    return terms, d_h, d_head


def squarehead(student: np.ndarray, teacher: np.ndarray) -> tuple[float, np.ndarray]:
    """One block's SquareHead term ``||s - t||^2 / ||t||^2`` and its gradient.

    The gradient with respect to ``s`` is ``2 (s - t) / ||t||^2``.

    The normalisation is llm-compressor's ``square_head`` (per layer, over the whole
    ``[T, D]`` output, by the teacher's squared norm); the loss sums the terms over blocks.

    Parameters
    ----------
    student, teacher : np.ndarray
        ``[T, D]`` the block's output in the student and in the teacher.

    Returns
    -------
    (float, np.ndarray)
        The term and its gradient with respect to ``student`` ``[T, D]``.
    """
    diff = student - teacher
    norm = float(np.sum(teacher * teacher, dtype=np.float64))
    if norm == 0.0:
        raise NpsparseError("the teacher's block output is zero: SquareHead is undefined")
    return float(np.sum(diff * diff, dtype=np.float64)) / norm, diff * (2.0 / norm)
