"""The Python API: load a model, tokenize, get logits, measure perplexity, generate.

>>> import npsparse
>>> llm = npsparse.load("smollm2")                # or a .gguf file, or a Hugging Face folder
>>> llm.perplexity(windows=4).ppl                 # first 4 windows of 512 tokens of the eval text
>>> llm.generate("The capital of France is", max_new_tokens=8).text
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arena import consolidate
from .data import TEXTS, read_text, windows as make_windows
from .errors import NpsparseError
from .evaluate import PerplexityResult, perplexity
from .generate import GenerationResult, generate
from .io import open_checkpoint
from .models import CausalLM, build_model
from .tokenizer import Tokenizer, load_tokenizer

DEFAULT_EVAL_WINDOWS = 40


class LLM:
    """A loaded model with its tokenizer.

    Parameters
    ----------
    model : CausalLM
        The forward pass (``model.forward(ids, cache) -> logits``).
    tokenizer : Tokenizer
    path : Path
        Where it was loaded from.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, path: Path, checkpoint=None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.checkpoint = checkpoint

    @property
    def config(self):
        """The model's :class:`~npsparse.config.ModelConfig` (architecture and sizes)."""
        return self.model.config

    def __repr__(self) -> str:
        cfg = self.config
        return (f"LLM({self.path.name}: {cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, "
                f"vocab {cfg.vocab_size})")

    def encode(self, text: str, *, special: bool = False) -> np.ndarray:
        """Tokenize ``text`` (no BOS is added).

        Parameters
        ----------
        text : str
        special : bool
            Parse special-token strings (``<|im_start|>`` ...) as their ids, as chat prompts need.

        Returns
        -------
        np.ndarray
            ``[T]`` int64 token ids. See :meth:`npsparse.tokenizer.Tokenizer.encode`.
        """
        return self.tokenizer.encode(text, special=special)

    def decode(self, ids) -> str:
        """The text of token ids.

        Parameters
        ----------
        ids : array-like of int
            ``[T]`` token ids.

        Returns
        -------
        str
        """
        return self.tokenizer.decode(ids)

    def logits(self, ids) -> np.ndarray:
        """Next-token logits at every position of a fresh sequence (no KV cache).

        Parameters
        ----------
        ids : array-like of int
            ``[T]`` token ids, each below the vocabulary size ``V``.

        Returns
        -------
        np.ndarray
            ``[T, V]`` float32; row ``t`` scores the token after ``ids[t]``.
        """
        return self.model.forward(np.asarray(ids))

    def eval_windows(self, data: str | Path = "pydoc", seqlen: int = 512,
                     windows: int | None = None) -> np.ndarray:
        """The token windows :meth:`perplexity` evaluates.

        Parameters
        ----------
        data : str or Path
            A named text, ``"pydoc"`` (the default) or ``"stdlib"``: its eval part (see
            :mod:`npsparse.data`); otherwise a UTF-8 text file, tokenized whole.
        seqlen : int
            Tokens per window; windows do not overlap and a partial last window is dropped.
        windows : int, optional
            Keep the first ``windows``; ``None`` means 40 for a named text and all of a file's.

        Returns
        -------
        np.ndarray
            ``[W, seqlen]`` int64 token ids.
        """
        ids = self.encode(read_text(data, part="eval"))
        if windows is None and str(data) in TEXTS:
            windows = DEFAULT_EVAL_WINDOWS
        return make_windows(ids, seqlen, windows)

    def perplexity(self, data: str | Path = "pydoc", seqlen: int = 512,
                   windows: int | None = None, *, progress: bool = False) -> PerplexityResult:
        """Perplexity on the first ``windows`` non-overlapping ``seqlen``-token windows of ``data``.

        Parameters
        ----------
        data, seqlen, windows
            As :meth:`eval_windows`.
        progress : bool
            Show a tqdm progress bar over the windows.

        Returns
        -------
        PerplexityResult
            ``exp`` of the mean next-token NLL over ``W * (seqlen - 1)`` predictions (no BOS; see
            :func:`npsparse.evaluate.perplexity`).
        """
        return perplexity(self.model, self.eval_windows(data, seqlen, windows), progress=progress)

    def chat_prompt(self, prompt: str) -> str:
        """``prompt`` wrapped as one user turn in the model's chat template.

        Parameters
        ----------
        prompt : str

        Returns
        -------
        str
            The rendered template, ending where the assistant's answer starts.
        """
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])

    def generate(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
                 on_text=None, adapt_threads: bool = True) -> GenerationResult:
        """Continue ``prompt``; greedy unless ``temperature > 0``.

        Parameters
        ----------
        prompt : str
        max_new_tokens : int
        temperature, top_k, top_p, seed
            Sampling settings (see :func:`npsparse.generate.sample_token`).
        chat : bool
            Wrap the prompt in the model's chat template and stop at end-of-turn.
        on_text : callable, optional
            Called with each new piece of text as it is generated (streaming); the pieces
            concatenate to ``text``.
        adapt_threads : bool
            Follow the machine's load with the decode thread count (see
            :func:`npsparse.generate.generate`); False keeps the count set beforehand.

        Returns
        -------
        GenerationResult
            With ``text`` filled in: the text of ``ids`` without the end-of-turn (or
            end-of-text) token that stopped generation, which stays in ``ids``.
        """
        text = self.chat_prompt(prompt) if chat else prompt
        ids = self.encode(text, special=chat)
        if len(ids) == 0:
            raise NpsparseError("the prompt is empty: generation needs at least one token")
        stop = self._end_of_turn_id() if chat else self.tokenizer.eos_token_id
        step = self.tokenizer.stream_decoder() if on_text else None

        def show(token):
            if token != stop:  # the end token ("<|im_end|>") is for the model, not the reader
                on_text(step(token))

        result = generate(self.model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, eos_token_id=stop,
                          on_token=show if on_text else None, adapt_threads=adapt_threads)
        result.text = self.decode(result.ids[:-1] if result.stopped_at_eos else result.ids)
        return result

    def _end_of_turn_id(self):
        eot = self.tokenizer.backend.token_to_id("<|im_end|>")
        return eot if eot is not None else self.tokenizer.eos_token_id


def load(model: str | Path = "smollm2") -> LLM:
    """Load a model and its tokenizer.

    Parameters
    ----------
    model : str or Path
        ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a GGUF file, a Hugging Face
        directory (``config.json``, safetensors, ``tokenizer.json``), or a packed folder
        (``npsparse pack``, see :mod:`npsparse.io.packed`).

    Returns
    -------
    LLM
    """
    checkpoint = open_checkpoint(model)
    network = build_model(checkpoint.config, checkpoint.weights)
    if getattr(checkpoint, "head", None) is not None:  # a packed folder's head (npsparse.io.packed)
        network.head = checkpoint.head
    # Block weights move onto huge pages and same-input layers stack (see arena); a packed
    # folder's arrays are copied there as stored, not repacked.
    consolidate(network)
    return LLM(network, load_tokenizer(checkpoint), checkpoint.path, checkpoint)
