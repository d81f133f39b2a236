"""Perplexity over non-overlapping windows, the way the pruning papers measure it.

Each window of ``L`` tokens is an independent sequence (no BOS, no carry-over); its first token is
never predicted, so a window contributes ``L - 1`` predictions. Perplexity is
``exp(mean NLL over all predicted tokens)``; with equal windows this equals the references'
``exp(mean of per-window mean NLL)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .errors import NpsparseError


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits.

    Parameters
    ----------
    logits : np.ndarray
        ``[T, V]`` float32.
    targets : np.ndarray
        ``[T]`` int token ids.

    Returns
    -------
    np.ndarray
        ``[T]`` float64, ``logsumexp(logits[t]) - logits[t, targets[t]]``.
    """
    rows = logits.astype(np.float64)  # [T, V]; float64 so 20k-term sums stay exact to ~1e-12
    peak = rows.max(axis=1, keepdims=True)  # [T, 1]
    lse = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))  # [T]
    return lse - rows[np.arange(len(targets)), targets]


@dataclass
class PerplexityResult:
    """Perplexity with everything needed to say what it was measured on."""

    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int
    seqlen: int
    seconds: float
    window_nll: list = field(default_factory=list)  # mean NLL of each window
    # [W, L-1] int64 argmax of each prediction's logits (perplexity(keep_argmax=True)), else None
    argmax: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The fields as a plain dict, for ``--json`` output (without ``argmax``)."""
        out = asdict(self)
        out.pop("argmax")
        return out

    def __str__(self) -> str:
        return (f"perplexity {self.ppl:.4f} (mean NLL {self.nll:.5f}) over {self.windows} windows "
                f"of {self.seqlen} tokens = {self.tokens} predictions, {self.seconds:.1f} s")


def perplexity(model, windows: np.ndarray, *, progress: bool = True,
               keep_argmax: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on token windows.

    Parameters
    ----------
    model : CausalLM
        Any npsparse model (``model.forward(ids) -> logits``).
    windows : np.ndarray
        ``[W, L]`` int token ids, one independent sequence per row (see
        :func:`npsparse.data.windows`).
    progress : bool
        Show a progress bar on stderr.
    keep_argmax : bool
        Also keep each prediction's most likely token (``PerplexityResult.argmax``), to compare
        two models' top-1 choices on the same windows.

    Returns
    -------
    PerplexityResult
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise NpsparseError(f"windows must be [W >= 1, L >= 2] token ids, got {windows.shape}")
    context = model.config.max_position
    if windows.shape[1] > context:
        raise NpsparseError(f"windows of {windows.shape[1]} tokens exceed the model's context of "
                            f"{context} positions (max_position_embeddings); use a shorter "
                            "--seqlen")
    start = time.perf_counter()
    window_nll = []
    top = [] if keep_argmax else None
    total = 0.0
    bar = tqdm(windows, desc="perplexity", unit="win", disable=not progress, leave=False)
    for ids in bar:
        logits = model.forward(ids)  # [L, V]
        if not np.all(np.isfinite(logits)):
            raise NpsparseError("the model produced NaN or infinite logits")
        nll = token_nll(logits[:-1], ids[1:])  # [L-1]
        if top is not None:
            top.append(np.argmax(logits[:-1], axis=1))  # [L-1]
        total += float(nll.sum())
        window_nll.append(float(nll.mean()))
        bar.set_postfix(ppl=f"{math.exp(total / (len(window_nll) * (len(ids) - 1))):.3f}")
    count = windows.shape[0] * (windows.shape[1] - 1)
    mean = total / count
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, tokens=count, windows=windows.shape[0],
        seqlen=windows.shape[1], seconds=time.perf_counter() - start, window_nll=window_nll,
        argmax=None if top is None else np.stack(top),
    )
