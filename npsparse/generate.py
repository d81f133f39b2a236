"""Text generation: greedy and temperature / top-k / top-p sampling over a KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import NpsparseError
from .threads import LoadAwareThreads


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Check sampling settings before any work is done.

    Parameters
    ----------
    temperature : float
        ``>= 0``; 0 means greedy.
    top_k : int
        ``>= 0``; 0 means no top-k cut.
    top_p : float
        In ``(0, 1]``; 1 means no nucleus cut.

    Raises
    ------
    NpsparseError
        One line naming the impossible setting.
    """
    if not np.isfinite(temperature) or temperature < 0:
        raise NpsparseError(f"temperature {temperature} is invalid: it must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise NpsparseError(f"top-k {top_k} is invalid: it must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise NpsparseError(f"top-p {top_p} is invalid: it must satisfy 0 < p <= 1")


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0) -> int:
    """Pick the next token from one row of logits.

    Parameters
    ----------
    logits : np.ndarray
        ``[V]`` float32.
    rng : np.random.Generator
        Source of randomness (unused when greedy).
    temperature : float
        0 means greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    top_k : int
        Keep only the ``k`` most likely tokens (0 = all).
    top_p : float
        Keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    Returns
    -------
    int
    """
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature  # [V]
    order = np.argsort(-scaled, kind="stable")  # most likely first
    if top_k:
        order = order[:top_k]
    kept = scaled[order]
    probs = np.exp(kept - kept[0])
    probs /= probs.sum()
    if top_p < 1.0:
        # Keep every token whose preceding cumulative probability is below top_p (so the first
        # token is always kept and the set just reaches top_p).
        before = np.cumsum(probs) - probs
        keep = before < top_p
        order, probs = order[keep], probs[keep]
        probs /= probs.sum()
    return int(order[rng.choice(len(order), p=probs)])


@dataclass
class GenerationResult:
    """Generated ids and text, with prefill and decode speed measured separately."""

    prompt_tokens: int
    ids: list = field(default_factory=list)  # generated token ids (not the prompt)
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_at_eos: bool = False
    thread_history: list = field(default_factory=list)  # (other processes' CPUs, threads) readings

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of the batched prefill (which also yields token 1)."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of one-token KV-cache decode steps (tokens 2..n)."""
        steps = max(len(self.ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        """The fields plus ``prefill_tok_s`` and ``decode_tok_s``, for ``--json`` output."""
        out = asdict(self)
        out.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return out


def generate(model, prompt_ids, max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None,
             adapt_threads: bool = True) -> GenerationResult:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens.

    The prompt is processed in batched forward passes of up to 512 tokens (prefill,
    :meth:`~npsparse.models.base.CausalLM.prefill`); each further token is one forward step over
    the KV cache (decode). Prompt plus new tokens must fit the model's context
    (``config.max_position``).

    Parameters
    ----------
    model : CausalLM
    prompt_ids : array-like
        ``[T]`` int token ids, non-empty.
    max_new_tokens : int
    temperature, top_k, top_p : see :func:`sample_token`.
    seed : int
        Seed of the sampler; the same seed gives the same tokens.
    eos_token_id : int, optional
        Stop after generating this token.
    on_token : callable, optional
        Called with each new token id as soon as it exists (for streaming).
    adapt_threads : bool
        During decode, run as many kernel threads as the other processes leave CPUs free
        (:class:`~npsparse.threads.LoadAwareThreads`; the count found is restored at the end).
        False keeps the count set beforehand (``npsparse.kernels.set_threads``). The tokens are
        the same either way.

    Returns
    -------
    GenerationResult
        ``text`` is left empty; the caller decodes ``ids`` with its tokenizer.
    """
    check_sampling(temperature, top_k, top_p)
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if prompt.ndim != 1 or len(prompt) == 0:
        raise NpsparseError("the prompt is empty: generation needs at least one token")
    if max_new_tokens < 1:
        raise NpsparseError(f"number of new tokens must be at least 1, got {max_new_tokens}")
    context = model.config.max_position
    if len(prompt) + max_new_tokens > context:
        raise NpsparseError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones "
                            f"exceeds the model's context of {context} positions "
                            "(max_position_embeddings)")
    rng = np.random.default_rng(seed)
    cache = model.new_cache(len(prompt) + max_new_tokens)
    result = GenerationResult(prompt_tokens=len(prompt))

    start = time.perf_counter()
    logits = model.prefill(prompt, cache)  # [V]
    token = sample_token(logits, rng, temperature, top_k, top_p)
    result.prefill_seconds = time.perf_counter() - start
    result.ids.append(token)
    if on_token:
        on_token(token)

    threads = LoadAwareThreads() if adapt_threads else None
    start = time.perf_counter()
    try:
        while len(result.ids) < max_new_tokens:
            if eos_token_id is not None and token == eos_token_id:
                break
            logits = model.forward(np.array([token]), cache)[-1]  # [V]
            token = sample_token(logits, rng, temperature, top_k, top_p)
            result.ids.append(token)
            if on_token:
                on_token(token)
            if threads is not None:
                threads.step()
    finally:
        if threads is not None:
            threads.close()
            result.thread_history = threads.history
    result.decode_seconds = time.perf_counter() - start
    result.stopped_at_eos = eos_token_id is not None and token == eos_token_id
    return result
