"""Read a GGUF file (llama.cpp's format) into a config and a lazily dequantized weight mapping.

Tensors are renamed to Hugging Face names here, in one table, so that the rest of npsparse speaks
one naming scheme. Dequantization is done by the ``gguf`` package, tensor by tensor, on access.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import NpsparseError
from .weights import Weights

# GGUF tensor name -> Hugging Face name ("{i}" is the block index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")

# GGUF `general.architecture` values npsparse reads. Mistral checkpoints convert to "llama".
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if npsparse does not use it.

    Parameters
    ----------
    gguf_name : str
        Tensor name as the GGUF file stores it, e.g. ``"blk.3.attn_q.weight"``.

    Returns
    -------
    str or None
        E.g. ``"model.layers.3.self_attn.q_proj.weight"``; None for a name outside the
        translation table (such as ``rope_freqs.weight``).
    """
    match = _BLOCK.match(gguf_name)
    if match:
        key = "blk.{i}." + match.group(2)
        target = _GGUF_TO_HF.get(key)
        return target.format(i=match.group(1)) if target else None
    return _GGUF_TO_HF.get(gguf_name)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K weights (HF rotate-half order back from pairs).

    llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders each head's rows from
    Hugging Face's "first half / second half" RoPE layout to interleaved pairs, so that its RoPE
    rotates adjacent elements. Viewing each head's rows as ``[2, hd/2]`` and swapping the axes is
    the permutation; the inverse views them as ``[hd/2, 2]`` and swaps back.

    Parameters
    ----------
    w : np.ndarray
        ``[H*hd, K]`` Q or K weight as llama.cpp stores it (a bias as ``[H*hd, 1]``), ``H`` the
        query or key/value head count.
    n_heads : int
        ``H``: the number of heads ``w``'s rows belong to.

    Returns
    -------
    np.ndarray
        ``[H*hd, K]``, same dtype, rows in Hugging Face (rotate-half) order.
    """
    rows, cols = w.shape  # [H*hd, K]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFCheckpoint:
    """A GGUF file opened for reading: config, tokenizer metadata and lazily loaded weights.

    Parameters
    ----------
    path : str or Path
        The ``.gguf`` file. It is memory-mapped; tensors are dequantized to float32 on access.
    """

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise NpsparseError(f"{self.path}: no such file")
        try:
            self.reader = GGUFReader(self.path)
        except Exception as err:  # the gguf package raises many kinds of errors on bad input
            raise NpsparseError(f"{self.path}: not a readable GGUF file ({_one_line(err)})") from None
        self.metadata = self._read_metadata()
        self.config = self._config()
        self._tensors = {}
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
        if "rope_freqs.weight" in {t.name for t in self.reader.tensors}:
            raise NpsparseError(
                f"{self.path}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 scaling) "
                "are not supported"
            )
        self.weights = Weights(
            names=list(self._tensors), loader=self._load, shapes=self._shapes(), source=self.path
        )

    def _read_metadata(self) -> dict:
        meta = {}
        for key, field in self.reader.fields.items():
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                       "tokenizer.ggml.scores"):
                continue  # large arrays: read on demand by the tokenizer
            try:
                meta[key] = field.contents()
            except Exception:
                meta[key] = None
        return meta

    def field(self, key: str):
        """One metadata value (including the large tokenizer arrays), or None.

        Unlike :attr:`metadata`, which skips the tokenizer's vocabulary, merges, scores and
        token types, this reads any key, on each call.

        Parameters
        ----------
        key : str
            GGUF metadata key, e.g. ``"tokenizer.ggml.tokens"``.

        Returns
        -------
        object or None
            The value as the ``gguf`` package decodes it (``ReaderField.contents()``: an int,
            float, bool or str, or a list of them for an array); None if the file has no ``key``.
        """
        field = self.reader.fields.get(key)
        return None if field is None else field.contents()

    def _config(self) -> ModelConfig:
        meta = self.metadata
        gguf_arch = meta.get("general.architecture")
        arch = _GGUF_ARCHS.get(gguf_arch)
        if arch is None:
            raise NpsparseError(
                f"{self.path}: GGUF architecture {gguf_arch!r} is not supported "
                f"(supported: {', '.join(_GGUF_ARCHS)})"
            )

        def get(key, default=None):
            value = meta.get(f"{gguf_arch}.{key}", default)
            if value is None:
                raise NpsparseError(f"{self.path}: metadata key {gguf_arch}.{key} is missing")
            return value

        scaling_type = meta.get(f"{gguf_arch}.rope.scaling.type")
        scaling = None
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise NpsparseError(
                    f"{self.path}: RoPE scaling {scaling_type!r} is not supported (supported: linear)"
                )
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = meta.get(f"{gguf_arch}.vocab_size") or (len(tokens.data) if tokens else None)
        if vocab is None:
            raise NpsparseError(f"{self.path}: vocabulary size is missing")
        has_output = any(t.name == "output.weight" for t in self.reader.tensors)
        head_dim = meta.get(f"{gguf_arch}.attention.key_length") or dim // n_heads
        return ModelConfig(
            arch=arch,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{gguf_arch}.attention.head_count_kv") or n_heads),
            head_dim=int(head_dim),
            ffn_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            max_position=int(get("context_length", 2048)),
            rope_theta=float(meta.get(f"{gguf_arch}.rope.freq_base") or 10000.0),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_embeddings=not has_output,
            qkv_bias=any(t.name.endswith("attn_q.bias") for t in self.reader.tensors),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )

    def _shapes(self) -> dict:
        # GGUF lists dimensions fastest-first; numpy (and Hugging Face) order is the reverse.
        return {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()}

    def q8_0_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A tensor's own Q8_0 blocks, undequantized, if the file stores it as Q8_0.

        Used for the output head / tied embedding, which llama.cpp's converters often keep in
        Q8_0 (SmolLM2's ``token_embd.weight``): a kernel on these arrays reads exactly the
        checkpoint's values at 1.0625 bytes per weight (:class:`npsparse.kernels.Q8Linear`).

        Parameters
        ----------
        name : str
            Hugging Face tensor name, e.g. ``"model.embed_tokens.weight"``.

        Returns
        -------
        (values, scales) or None
            ``[N, K]`` int8 and ``[N, K/32]`` float16 (see
            :func:`npsparse.kernels.q8.q8_0_from_blocks`); None if the tensor is missing, not
            2-D, not Q8_0, or a Q/K weight (those are stored with permuted rows).
        """
        from gguf import GGMLQuantizationType

        from ..kernels.q8 import q8_0_from_blocks

        tensor = self._tensors.get(name)
        if (tensor is None or tensor.tensor_type != GGMLQuantizationType.Q8_0
                or len(tensor.shape) != 2 or "q_proj" in name or "k_proj" in name):
            return None
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return q8_0_from_blocks(tensor.data, shape)

    def _load(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        qtype = tensor.tensor_type
        try:
            if qtype == GGMLQuantizationType.F32:
                array = tensor.data
            else:
                array = dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise NpsparseError(
                f"{self.path}: tensor {tensor.name} has quant type {qtype.name}, which the gguf "
                "package cannot dequantize"
            ) from None
        except Exception as err:
            raise NpsparseError(
                f"{self.path}: tensor {tensor.name} could not be read ({_one_line(err)})"
            ) from None
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")) and (
            self.metadata.get("general.architecture") == "llama"
        ):
            heads = self.config.n_heads if "q_proj" in name else self.config.n_kv_heads
            if array.ndim == 1:
                array = unpermute_qk(array[:, None], heads)[:, 0]
            else:
                array = unpermute_qk(array, heads)
        return array


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
