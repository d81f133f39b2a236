"""What every architecture shares: the KV cache, the forward loop, and access to linear layers."""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import NpsparseError
from ..linear import DenseLinear, Linear


PREFILL_CHUNK = 512  # prompt tokens per pass through the blocks (see CausalLM.prefill)


class KVCache:
    """Keys and values of past positions, preallocated for ``capacity`` positions.

    ``k[i]`` and ``v[i]`` are layer ``i``'s ``[KV, capacity, hd]`` float32 buffers;
    ``length`` positions are filled.
    """

    def __init__(self, config: ModelConfig, capacity: int):
        shape = (config.n_kv_heads, capacity, config.head_dim)
        self.k = [np.zeros(shape, dtype=np.float32) for _ in range(config.n_layers)]
        self.v = [np.zeros(shape, dtype=np.float32) for _ in range(config.n_layers)]
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values of all layers (the whole capacity)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


class CausalLM:
    """A decoder-only language model: ``embed -> blocks -> final norm -> head``.

    Subclasses set ``config``, ``blocks`` (each with a ``linears`` dict of the seam objects and a
    ``__call__(x, start, cache_k, cache_v)``) and implement ``embed``, ``final`` and
    ``state_dict``. Every matrix product of the blocks and the head goes through a
    :class:`~npsparse.linear.Linear`, so sparse kernels can be swapped in with
    :meth:`set_linear`.
    """

    config: ModelConfig
    blocks: list
    head: Linear
    # A one-token path for decode with a cache (``decode_block(block, x, start, cache_k,
    # cache_v)`` and ``decode_final(model, x)``), or None to run the blocks' own body.
    decode_block = None
    decode_final = None
    # The whole one-token step in one compiled call (``decode_token(model, ids, start, cache)``,
    # returning the logits, or None where it does not apply), tried before decode_block.
    decode_token = None
    # Positions come from a learned table of ``config.max_position`` rows (GPT-2, OPT), so no
    # sequence may be longer. RoPE models compute any position (generate and eval refuse
    # prompts past ``max_position`` themselves).
    learned_positions = False

    def embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Input embeddings of the new tokens.

        Parameters
        ----------
        ids : np.ndarray
            ``[T]`` int64 token ids.
        start : int
            Position of the first token (models with learned positions add them).

        Returns
        -------
        np.ndarray
            ``[T, D]`` float32.
        """
        raise NotImplementedError

    def final(self, x: np.ndarray) -> np.ndarray:
        """Final norm and output head.

        Parameters
        ----------
        x : np.ndarray
            ``[T, D]`` float32, the last block's output.

        Returns
        -------
        np.ndarray
            ``[T, V]`` float32 logits.
        """
        raise NotImplementedError

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for up to ``capacity`` positions (default: the model's maximum).

        Parameters
        ----------
        capacity : int, optional
            Positions to preallocate per layer. None (or 0) means ``config.max_position``.

        Returns
        -------
        KVCache
            ``length`` 0, with ``[KV, capacity, hd]`` float32 zero buffers for every layer.
        """
        return KVCache(self.config, capacity or self.config.max_position)

    def forward(self, ids: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Logits for every position of ``ids``.

        Parameters
        ----------
        ids : np.ndarray
            ``[T]`` integer token ids.
        cache : KVCache, optional
            Positions already processed. The new tokens continue from ``cache.length``; their keys
            and values are appended. Without a cache the ids are a fresh sequence.

        Returns
        -------
        np.ndarray
            ``[T, V]`` float32 logits.
        """
        ids = self._check_ids(ids)
        start = cache.length if cache is not None else 0
        self._check_positions(start + len(ids), cache)
        if cache is None:
            x = self.embed(ids, start)  # [T, D]
            for block in self.blocks:
                x = block(x, start)
            return self.final(x)  # [T, V]
        if len(ids) > 1 or self.decode_block is None:
            return self.final(self._blocks_forward(ids, cache))  # [T, V]
        if self.decode_token is not None:
            logits = self.decode_token(self, ids, start, cache)  # [1, V] or None
            if logits is not None:
                cache.length = start + 1
                return logits
        x = self.embed(ids, start)  # [1, D]; one token: the compiled decode steps
        for i, block in enumerate(self.blocks):
            x = self.decode_block(block, x, start, cache.k[i], cache.v[i])
        cache.length = start + 1
        return self.decode_final(self, x)  # [1, V]

    def prefill(self, ids: np.ndarray, cache: KVCache, *, chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Append ``ids`` to ``cache`` and return the logits of the last position only.

        The prompt goes through the blocks ``chunk`` tokens at a time, so attention scores are
        ``[H, chunk, positions]`` rather than ``[H, T, T]`` and only one row of logits is made:
        memory grows linearly with the prompt instead of quadratically (a 4,400-token prompt no
        longer needs gigabytes). Equal to ``forward(ids, cache)[-1]`` up to float rounding.

        Parameters
        ----------
        ids : np.ndarray
            ``[T]`` integer token ids.
        cache : KVCache
            Positions already processed; the new ones are appended.
        chunk : int
            Tokens per pass through the blocks.

        Returns
        -------
        np.ndarray
            ``[V]`` float32 logits of the last position.
        """
        ids = self._check_ids(ids)
        self._check_positions(cache.length + len(ids), cache)
        for lo in range(0, len(ids), chunk):
            x = self._blocks_forward(ids[lo:lo + chunk], cache)  # [<=chunk, D]
        return self.final(x[-1:])[0]  # [V]

    def _blocks_forward(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """The last block's output ``[T, D]`` for ``ids`` appended to ``cache``."""
        start = cache.length
        x = self.embed(ids, start)  # [T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, start, cache.k[i], cache.v[i])
        cache.length = start + len(ids)
        return x

    def _check_positions(self, end: int, cache: KVCache | None) -> None:
        if end > self.config.max_position and self.learned_positions:
            raise NpsparseError(
                f"sequence of {end} positions exceeds the model's {self.config.max_position}"
            )
        if cache is not None and end > cache.capacity:
            raise NpsparseError(f"sequence of {end} positions exceeds the cache's {cache.capacity}")

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise NpsparseError(
                f"token ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise NpsparseError(
                f"token id {int(ids.max()) if ids.max() >= 0 else int(ids.min())} is outside the "
                f"vocabulary of {self.config.vocab_size}"
            )
        return ids.astype(np.int64)

    # -- the linear-layer seam ---------------------------------------------------------------

    def linears(self) -> dict[str, Linear]:
        """Every prunable linear layer of the blocks, by Hugging Face module name."""
        out = {}
        for i, block in enumerate(self.blocks):
            for name, layer in block.linears.items():
                out[f"{self.block_prefix(i)}.{name}"] = layer
        return out

    def block_prefix(self, i: int) -> str:
        """Checkpoint name prefix of block ``i`` (``model.layers.3``, ``transformer.h.3`` ...).

        Parameters
        ----------
        i : int
            Block index, ``0 <= i < config.n_layers``.

        Returns
        -------
        str
            The prefix without a trailing dot; a block tensor's full name is
            ``f"{prefix}.{name}"``.
        """
        raise NotImplementedError

    def load_block(self, i: int):
        """Build block ``i`` from the checkpoint's weights (pruning streams blocks this way).

        The block is returned, not stored in ``self.blocks``; a model built with
        ``load_blocks=False`` can so hold one block at a time.

        Parameters
        ----------
        i : int
            Block index, ``0 <= i < config.n_layers``.

        Returns
        -------
        block
            The architecture's block object, with its ``linears`` dict and
            ``__call__(x, start, cache_k, cache_v)`` mapping ``[T, D]`` float32 to ``[T, D]``.

        Raises
        ------
        NpsparseError
            A tensor of the block is missing, has the wrong shape, or holds NaN or infinite
            values.
        """
        raise NotImplementedError

    def outer_state(self) -> dict[str, np.ndarray]:
        """The tensors outside the blocks (embeddings, final norm, head), as stored."""
        raise NotImplementedError

    def block_state(self, i: int, block=None) -> dict[str, np.ndarray]:
        """Block ``i``'s tensors under checkpoint names (``block`` defaults to the model's).

        Parameters
        ----------
        i : int
            Block index; gives the name prefix (:meth:`block_prefix`).
        block : optional
            A block to read instead of ``self.blocks[i]``, e.g. one built by :meth:`load_block`
            and pruned while ``self.blocks`` is empty.

        Returns
        -------
        dict of str -> np.ndarray
            Full checkpoint name -> dense float32 tensor, in the shape the checkpoint stores it
            (linear layers densified with ``to_dense()``).
        """
        block = self.blocks[i] if block is None else block
        return {f"{self.block_prefix(i)}.{k}": v for k, v in block.state().items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """All weights under their checkpoint names (dense float32), as a checkpoint stores them."""
        out = self.outer_state()
        for i in range(len(self.blocks)):
            out.update(self.block_state(i))
        return out

    def set_linear(self, name: str, layer: Linear) -> None:
        """Replace the linear layer ``name`` (a key of :meth:`linears`) by ``layer``.

        Parameters
        ----------
        name : str
            Full Hugging Face module name, e.g. ``model.layers.3.mlp.down_proj``.
        layer : Linear
            The replacement seam object (dense or a sparse format), of the same ``(N, K)``
            shape as the layer it replaces.

        Raises
        ------
        NpsparseError
            No linear layer is called ``name``, or ``layer`` has a different shape.
        """
        for i, block in enumerate(self.blocks):
            prefix = self.block_prefix(i) + "."
            if name.startswith(prefix) and name[len(prefix):] in block.linears:
                old = block.linears[name[len(prefix):]]
                if tuple(layer.shape) != tuple(old.shape):
                    raise NpsparseError(
                        f"{name}: new layer has shape {layer.shape}, not {old.shape}")
                block.linears[name[len(prefix):]] = layer
                return
        raise NpsparseError(f"no linear layer named {name}")

    def weight_bytes(self) -> int:
        """Bytes of weights read to decode one token (block linears, head, one embedding row)."""
        total = sum(layer.nbytes for layer in self.linears().values()) + self.head.nbytes
        return int(total + self.config.dim * 4)


def dense(weight: np.ndarray) -> DenseLinear:
    """Wrap a weight matrix as a dense seam object.

    Parameters
    ----------
    weight : np.ndarray
        ``[N, K]`` weight, stored as float32 (copied only if it is not already float32 and
        C-contiguous).

    Returns
    -------
    DenseLinear
        Computes ``x @ weight.T``: ``[T, K]`` float32 in, ``[T, N]`` float32 out.
    """
    return DenseLinear(weight)
