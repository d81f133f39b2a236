"""Tokenizers from ``tokenizer.json`` or from GGUF metadata, via the ``tokenizers`` package.

A GGUF file carries a byte-level BPE vocabulary and merge list plus a ``tokenizer.ggml.pre`` name
for the pre-tokenizer llama.cpp applies before BPE. That name is translated here into the same
``tokenizers`` pipeline the original ``tokenizer.json`` would describe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import NpsparseError

# Split patterns of llama.cpp's pre-tokenizers (llama-vocab.cpp), which come from the models' own
# tokenizer.json files. "llama3" is the cl100k pattern; Qwen2 is the same with single digits.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# GGUF token types (gguf.TokenType): 3 = control (special), 4 = user-defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


def check_text(text: str, what: str = "the text") -> None:
    """Refuse text that is not valid Unicode, before the tokenizer fails on it.

    Python turns bytes that are not UTF-8 in ``sys.argv`` (or in a file read with
    ``errors="surrogateescape"``) into lone surrogates such as ``"\\udcff"``, which the
    ``tokenizers`` package rejects with a ``TypeError``.

    Parameters
    ----------
    text : str
    what : str
        How the error message names ``text``.

    Raises
    ------
    NpsparseError
        One line naming the first bad character and its position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ascii(text[err.start])
        raise NpsparseError(f"{what} is not valid UTF-8: character {err.start} is {bad}, an "
                            "undecodable byte or a lone surrogate") from None


def _gguf_pre_tokenizer(pre: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default", "starcoder", "refact"):
        return byte_level, False
    if pre == "smollm":
        # SmolLM's tokenizer.json splits every digit into its own token before the GPT-2 split.
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level]), False
    if pre in ("llama3", "llama-bpe", "smaug-bpe"):
        split = pt.Split(Regex(_LLAMA3_PATTERN), behavior="isolated")
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    if pre == "qwen2":
        split = pt.Split(Regex(_QWEN2_PATTERN), behavior="isolated")
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)]), False
    raise NpsparseError(
        f"GGUF pre-tokenizer {pre!r} is not supported "
        "(supported: gpt2, default, smollm, llama3/llama-bpe, qwen2)"
    )


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    Parameters
    ----------
    backend : tokenizers.Tokenizer
        The ``tokenizers`` object doing the work.
    bos_token_id, eos_token_id : int or None
        Special ids; BOS is never added implicitly (perplexity uses no BOS).
    chat_template : str or None
        A Jinja template as shipped with instruct models.
    """

    def __init__(self, backend, bos_token_id=None, eos_token_id=None, chat_template=None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, chat_template=None, bos_token_id=None, eos_token_id=None):
        """Load a Hugging Face ``tokenizer.json``.

        Parameters
        ----------
        path : str or Path
        chat_template : str, optional
            Jinja template (from ``tokenizer_config.json``).
        bos_token_id, eos_token_id : int, optional

        Returns
        -------
        Tokenizer

        Raises
        ------
        NpsparseError
            If the file is not a valid ``tokenizer.json``.
        """
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as err:
            raise NpsparseError(f"{path}: not a valid tokenizer.json ({err})") from None
        return cls(backend, bos_token_id, eos_token_id, chat_template)

    @classmethod
    def from_gguf(cls, checkpoint) -> "Tokenizer":
        """Build the byte-level BPE tokenizer described by a GGUF file's metadata.

        Parameters
        ----------
        checkpoint : GGUFCheckpoint
            Its ``tokenizer.ggml.*`` fields: vocabulary, merges, token types, pre-tokenizer
            (``gpt2``/``default``, ``smollm``, ``llama3``/``llama-bpe`` or ``qwen2``), BOS/EOS
            and chat template.

        Returns
        -------
        Tokenizer

        Raises
        ------
        NpsparseError
            For tokenizer models other than byte-level BPE, or unknown pre-tokenizers.
        """
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as Backend

        path = checkpoint.path
        kind = checkpoint.metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NpsparseError(
                f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
                "'gpt2'); use a Hugging Face directory with tokenizer.json instead"
            )
        tokens = checkpoint.field("tokenizer.ggml.tokens")
        merges = checkpoint.field("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise NpsparseError(f"{path}: tokenizer vocabulary or merges missing from metadata")
        pre = checkpoint.metadata.get("tokenizer.ggml.pre") or "default"
        pre_tokenizer, ignore_merges = _gguf_pre_tokenizer(pre)
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        types = checkpoint.field("tokenizer.ggml.token_type")
        if types is not None:
            added = [
                AddedToken(tokens[i], special=(kind_ == _CONTROL), normalized=False)
                for i, kind_ in enumerate(types) if kind_ in (_CONTROL, _USER_DEFINED)
            ]
            backend.add_tokens(added)
        meta = checkpoint.metadata
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    # -- use -----------------------------------------------------------------------------

    def encode(self, text: str, *, special: bool = False) -> np.ndarray:
        """Token ids of ``text`` (no BOS).

        Parameters
        ----------
        text : str
        special : bool
            Parse special-token text such as ``<|im_start|>`` as the special token (chat
            prompts); when False it is tokenized as plain text.

        Returns
        -------
        np.ndarray
            ``[T]`` int64 token ids.

        Raises
        ------
        NpsparseError
            If ``text`` is not valid UTF-8 (see :func:`check_text`).
        """
        check_text(text)
        self.backend.encode_special_tokens = not special
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """The text of token ids.

        Parameters
        ----------
        ids : array-like of int
        skip_special : bool
            Leave out special tokens (``<|im_end|>`` ...).

        Returns
        -------
        str
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def stream_decoder(self):
        """A function ``step(id) -> str`` giving the new text for each generated token."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=False)

        def step(token_id: int) -> str:
            return stream.step(self.backend, int(token_id)) or ""

        return step

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (in a sandboxed Jinja).

        Parameters
        ----------
        messages : list of dict
            ``{"role": "system" | "user" | "assistant", "content": str}`` in order.
        add_generation_prompt : bool
            End with the opening of an assistant turn.

        Returns
        -------
        str

        Raises
        ------
        NpsparseError
            If the model has no chat template or it fails to render.
        """
        if not self.chat_template:
            raise NpsparseError("this model has no chat template; run without --chat")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_token_id),
                eos_token=self._token_text(self.eos_token_id),
            )
        except jinja2.TemplateError as err:
            raise NpsparseError(f"chat template failed to render: {err}") from None

    def _token_text(self, token_id) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(int(token_id)) or ""

    def to_json(self) -> str:
        """The tokenizer serialized as ``tokenizer.json`` text."""
        return self.backend.to_str(pretty=False)


def load_tokenizer(checkpoint) -> Tokenizer:
    """The tokenizer that belongs to an opened checkpoint.

    Parameters
    ----------
    checkpoint : GGUFCheckpoint or HFCheckpoint
        From :func:`npsparse.open_checkpoint`.

    Returns
    -------
    Tokenizer
        From the GGUF metadata, or the folder's ``tokenizer.json`` (with the chat template of
        ``tokenizer_config.json`` and the BOS/EOS ids of ``config.json``).

    Raises
    ------
    NpsparseError
        If a folder has no ``tokenizer.json``.
    """
    from .io import GGUFCheckpoint

    if isinstance(checkpoint, GGUFCheckpoint):
        return Tokenizer.from_gguf(checkpoint)
    path = checkpoint.tokenizer_path
    if path is None:
        raise NpsparseError(f"{checkpoint.path}: no tokenizer.json in the model directory")
    config = checkpoint.config
    return Tokenizer.from_file(path, checkpoint.chat_template, config.bos_token_id,
                               config.eos_token_id)
