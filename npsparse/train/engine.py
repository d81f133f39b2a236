"""A LLaMA-family model's loss and gradients on one token window: forward, losses, backward.

The forward is the blocks' own body (:class:`~npsparse.models.llama.LlamaBlock`) run with a tape
per block; the backward walks the blocks in reverse with ``block.backward``. The model's arrays
are the parameters: :func:`parameters` lists them by Hugging Face name, and an optimizer updates
them in place. Works in float32 and, for gradient checks, float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NpsparseError
from ..models.backward import embedding_backward, rms_norm_backward
from ..models.layers import rms_norm
from ..routing import balance_loss, balance_loss_backward
from .losses import head_losses, squarehead

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms: ``ce * CE + kd * KL + squarehead * sum_l SquareHead_l``.

    ``balance`` (``alpha``) adds ``alpha * sum_l E * sum_i f_i P_i``, the Switch-Transformer
    load-balancing loss of every routed block (PESC experts, routed-FFN unit blocks;
    :func:`npsparse.routing.balance_loss`) summed over
    blocks as Switch sums its layers' (``finetune --balance``, not a ``--loss`` term).
    """

    ce: float = 1.0
    kd: float = 0.0
    squarehead: float = 0.0
    temperature: float = 1.0
    balance: float = 0.0

    @classmethod
    def parse(cls, text: str, temperature: float = 1.0, balance: float = 0.0) -> "LossWeights":
        """Read ``"ce"``, ``"squarehead"``, ``"ce+squarehead"``, ``"0.5*ce+kd"`` ...

        Parameters
        ----------
        text : str
            Terms ``ce``, ``kd``, ``squarehead`` joined by ``+``, each optionally ``WEIGHT*``.
        temperature : float
            Temperature of the ``kd`` term.
        balance : float
            ``alpha`` of the balance loss of routed blocks (0: off).

        Returns
        -------
        LossWeights
        """
        weights = {"ce": 0.0, "kd": 0.0, "squarehead": 0.0}
        for part in text.split("+"):
            weight, _, name = part.strip().rpartition("*")
            if name not in weights:
                raise NpsparseError(f"unknown loss term {name!r} in {text!r} (terms: ce, kd, "
                                    "squarehead, joined by +, e.g. ce+squarehead)")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                raise NpsparseError(f"loss weight {weight!r} in {text!r} is not a number") from None
            if not np.isfinite(value) or value <= 0:
                raise NpsparseError(f"loss weight {weight!r} in {text!r} must be positive")
            weights[name] += value
        if not np.isfinite(temperature) or temperature <= 0:
            raise NpsparseError(f"temperature must be positive, got {temperature}")
        if not np.isfinite(balance) or balance < 0:
            raise NpsparseError(f"--balance must be 0 or more, got {balance}")
        return cls(temperature=temperature, balance=balance, **weights)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term compares with a teacher (``kd`` or ``squarehead``)."""
        return bool(self.kd or self.squarehead)

    def __str__(self) -> str:
        return "+".join(f"{w:g}*{n}" for n, w in (("ce", self.ce), ("kd", self.kd),
                                                    ("squarehead", self.squarehead),
                                                    ("balance", self.balance)) if w)


def parameters(model) -> dict[str, np.ndarray]:
    """Every array of a LLaMA-family model by Hugging Face name (the live arrays, not copies).

    The embedding is listed once; with tied embeddings it is also the head.

    Parameters
    ----------
    model : LlamaModel
        Built with dense layers, or trainable packed ones (Monarch), whose arrays are listed
        as ``NAME.weight::ARRAY`` (``model.layers.0.mlp.up_proj.weight::right``).

    Returns
    -------
    dict of str -> np.ndarray
    """
    if model.config.family != "llama":
        raise NpsparseError(f"training supports the LLaMA family, not {model.config.arch}")
    out = {EMBED: model.embed_tokens, NORM: model.norm}
    if not model.config.tie_embeddings:
        out[HEAD] = model.head.weight
    for i, block in enumerate(model.blocks):
        out.update({f"{model.block_prefix(i)}.{k}": v for k, v in block.parameters().items()})
    return out


def hidden_states(model, ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Forward only: every block's output and the final normed hidden state (a teacher's view).

    Parameters
    ----------
    model : LlamaModel
    ids : np.ndarray
        ``[T]`` token ids.

    Returns
    -------
    (list of np.ndarray, np.ndarray)
        ``n_layers`` arrays ``[T, D]`` and ``[T, D]`` after ``model.norm``.
    """
    x = model.embed(ids, 0)  # [T, D]
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs, rms_norm(x, model.norm, model.config.norm_eps)


def head_of(model) -> np.ndarray:
    """The output head's array (the embedding matrix when tied).

    Parameters
    ----------
    model : LlamaModel

    Returns
    -------
    np.ndarray
        ``[V, D]``.
    """
    return model.embed_tokens if model.config.tie_embeddings else model.head.weight


def loss_and_grads(model, ids: np.ndarray, losses: LossWeights, *, teacher=None,
                   trainable=None, into: dict | None = None,
                   scale: float = 1.0) -> tuple[dict, dict]:
    """Loss terms on one window and the gradients of their weighted sum.

    Parameters
    ----------
    model : LlamaModel
        The student (dense layers; pruned weights are zeros, masking is the optimizer's).
    ids : np.ndarray
        ``[T]`` token ids; positions ``0 .. T-2`` predict ``ids[1:]``.
    losses : LossWeights
    teacher : (list of np.ndarray, np.ndarray), optional
        The teacher's :func:`hidden_states` on ``ids`` and its head, as
        ``(block_outputs, final_h, head)``; needed for ``kd`` and ``squarehead``.
    trainable : container of str, optional
        Names whose gradients are wanted (None: all of :func:`parameters`).
    into : dict of str -> np.ndarray, optional
        Gradient accumulators by name: ``scale * gradient`` is added to them (and they are
        returned). Without it, new arrays are returned.
    scale : float
        Factor on every gradient (``1 / batch`` when accumulating a batch).

    Returns
    -------
    (dict, dict)
        Loss terms ``{"ce", "kd", "squarehead", "balance", "loss"}`` as floats (unweighted
        terms, weighted total), and gradients by name.
    """
    cfg = model.config
    if losses.needs_teacher and teacher is None:
        raise NpsparseError("this loss needs a teacher")
    want = (lambda name: True) if trainable is None else trainable.__contains__
    grads = {} if into is None else into

    def add(name: str, grad: np.ndarray) -> None:  # grad is already scaled (see d_h below)
        if name in grads:
            grads[name] += grad
        else:
            grads[name] = grad

    # forward, keeping a tape per block
    tapes = [{} for _ in model.blocks]
    x = model.embed(ids, 0)  # [T, D]
    outputs = []
    for block, tape in zip(model.blocks, tapes):
        x = block(x, tape=tape)
        outputs.append(x)
    h = rms_norm(x, model.norm, cfg.norm_eps)  # [T, D]
    balance, d_logits = balance_terms(model, tapes, losses.balance, scale)

    # losses and the gradient at the top
    head = head_of(model)
    head_name = EMBED if cfg.tie_embeddings else HEAD
    t_out, t_h, t_head = teacher if teacher is not None else (None, None, None)
    # The weights carry ``scale``, so every gradient below comes out scaled.
    terms, d_h, d_head = head_losses(
        h, head, ids[1:], ce=scale * losses.ce, kd=scale * losses.kd,
        temperature=losses.temperature, teacher_h=t_h, teacher_head=t_head,
        head_grad=want(head_name))
    if d_head is not None:
        add(head_name, d_head)
    d_x, d_norm = rms_norm_backward(d_h, x, model.norm, cfg.norm_eps)
    if want(NORM):
        add(NORM, d_norm)

    # backward through the blocks, adding each block's SquareHead gradient at its output
    sq_total = 0.0
    for i in reversed(range(len(model.blocks))):
        if losses.squarehead:
            term, d_sq = squarehead(outputs[i], t_out[i])
            sq_total += term
            d_x = d_x + (scale * losses.squarehead) * d_sq
        prefix = f"{model.block_prefix(i)}."
        local = None if trainable is None else {n[len(prefix):] for n in trainable
                                                if n.startswith(prefix)}
        d_x, block_grads = model.blocks[i].backward(d_x, tapes[i], local, d_logits[i])
        tapes[i] = None  # its activations are no longer needed
        for name, grad in block_grads.items():
            add(prefix + name, grad)
    if want(EMBED):
        add(EMBED, embedding_backward(d_x, ids, cfg.vocab_size))
    if losses.squarehead:
        terms["squarehead"] = sq_total
    if losses.balance:
        terms["balance"] = balance
    terms["loss"] = (losses.ce * terms.get("ce", 0.0) + losses.kd * terms.get("kd", 0.0)
                     + losses.squarehead * terms.get("squarehead", 0.0)
                     + losses.balance * balance)
    return terms, grads


def balance_terms(model, tapes: list, alpha: float, scale: float) -> tuple[float, list]:
    """The routed blocks' balance losses (unweighted, summed) and their logits' gradients.

    A routed block is a PESC block (experts) or a routed FFN (blocks of units, the "experts"
    of the loss: ``f_i`` the share of the ``T*A`` chosen slots, ``P_i`` the mean router
    probability).

    Parameters
    ----------
    model : LlamaModel
    tapes : list of dict
        The blocks' tapes of one forward (a PESC block's holds ``moe``, a routed FFN's
        ``routed_ffn``).
    alpha : float
        The loss's weight; 0: no balance loss (0.0 and no gradients).
    scale : float
        Factor on the gradients (``1 / batch``).

    Returns
    -------
    (float, list)
        ``sum_l E * sum_i f_i P_i`` over routed blocks, and per block ``[T, E]`` gradients of
        ``scale * alpha`` times it with respect to that block's logits (None elsewhere).
    """
    total, d_logits = 0.0, [None] * len(tapes)
    if not alpha:
        return total, d_logits
    for i, tape in enumerate(tapes):
        routed = tape.get("moe") or tape.get("routed_ffn")  # PESC experts or FFN unit blocks
        if routed:
            logits, chosen = routed["logits"], routed["chosen"]  # [T, E], [T, k]
            total += balance_loss(logits, chosen, 1.0)
            d_logits[i] = balance_loss_backward(logits, chosen, alpha, d_loss=scale)
    return total, d_logits
