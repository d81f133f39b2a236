"""Sparse fine-tuning of a whole model: data, teacher, masked AdamW steps, resume, output folder.

``finetune(model, out, settings)`` trains every block weight that pruning kept (the zeros stay
zero), the norms, and optionally the embedding, against a loss of cross-entropy, KL to a teacher
and/or SquareHead (Kurtic et al. 2023). With ``settings.method`` ``lora``, ``pst`` or ``sara``
only adapters on the block weights train instead (:mod:`npsparse.train.adapted`): PST prunes a
dense model while it trains, and every adapter is merged into the weights that are saved. With
``pesc`` every FFN becomes a mixture of adapter experts (:mod:`npsparse.train.pesc`): only the
routers and adapters train, and the output folder keeps them (``config.json`` says so). With
``routed-ffn`` every FFN runs only its router's top-A blocks of units (SPT,
:mod:`npsparse.train.routed_ffn`): the routers and FFN weights train, the folder keeps them;
``--router-init oracle`` first ridge-fits every router, on the dense model's first 8 training
windows of the run, to predict the blocks with the largest activation norms. The
teacher is the dense model the pruned folder came from; it runs forward only, *online*: its
block outputs for one 512-token window are 35 MB (SmolLM2), so caching them for every window of
a run would take several GB of disk per run, read back at every step, while recomputing them
costs a quarter of a step's arithmetic.

Windows come from the calibration part of the named text(s) (never an eval part), shuffled by
seed (a mix such as ``pydoc+stdlib`` takes as many windows of each text, interleaved); the last
``val_windows`` windows are held out for a validation loss. Perplexity before and after is
measured on pydoc's eval part and on that of each other named text of the data, one result
per text (``ppl_by_domain``). The optimizer step ``s`` reads the same windows whatever happened
before it, so a run interrupted (Ctrl-C or SIGTERM: the current step finishes, then a resumable
state is written atomically beside ``out``) and resumed with ``--resume`` ends with the same
weights as an uninterrupted one, with or without adapters.

A folder written by ``npsparse monarch`` trains as it is stored: its Monarch layers' factors
``R`` and ``L`` are parameters (``NAME.weight::right``, ``::left``) beside the other layers' dense
weights and the norms, and the output is again a Monarch folder (:mod:`npsparse.io.packed`)
holding the trained factors in float32, with ``finetune.json``. Design: the block's backward
hands each Monarch layer its ``(x, dY)`` and the layer returns ``dx`` and the factor gradients
from :func:`~npsparse.kernels.monarch.monarch_backward` (two batched matmuls). The other route,
training a dense ``W_eff = to_dense()`` as the adapters do and turning the engine's ``dL/dW_eff``
into factor gradients by the chain rule through ``to_dense`` (linear in each factor), would
reuse the adapter loop but densify every Monarch layer before each step, run its forward and
backward at dense cost (three ``[N, K]`` products instead of ``q (N + K) / (N K)`` of that,
34% for SmolLM2's MLPs at ``b = 4``) and keep ``[N, K]`` weights and gradients in memory; it
also needs a second parameter path (factors beside dense weights) through the loop, the state
and the output. The direct route needs no change to the loop: the factors are named arrays like
any weight, so AdamW, clipping, ``--resume`` and the same-seed sha256 work as they do for dense
weights (a test checks both routes give the same factor gradients). Adapters (``--method``) are
for dense weights and refuse a Monarch folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..api import LLM
from ..data import TEXTS, domains, interleave, read_text, token_hash
from ..data import windows as make_windows
from ..errors import NpsparseError
from ..evaluate import perplexity
from ..io import HFDirWriter, open_checkpoint
from ..io.hf_dir import check_replaceable
from ..io.packed import save_packed
from ..io.weights import DictWeights
from ..linear import DenseLinear
from ..models import build_model
from ..tokenizer import load_tokenizer
from ..prune.patterns import Pattern
from ..roofline import cpu_name
from .adapted import METHODS, AdaptedModel, block_weight_names
from ..config import PescConfig, RoutedFfnConfig
from ..ffn_routing import check_blocks
from .adapters import SparsitySchedule, check_fraction, check_rank
from .engine import LossWeights, head_of, hidden_states, loss_and_grads, parameters
from .losses import head_losses, squarehead
from .optim import AdamW, AdamWSettings, clip_by_global_norm, learning_rate
from .pesc import (DEFAULT_BALANCE, DEFAULT_SCALE, check_pesc, pesc_names, routing_summary,
                   with_pesc)
from .routed_ffn import (FIT_WINDOWS, ROUTER_INITS, block_load, fit_routers, routed_names,
                         set_routers, with_routed_ffn)

REPORT = "finetune.json"
# a folder npsparse pruned, converted to Monarch (packed.json names its dense teacher, first: a
# ce-only run's finetune.json names none) or fine-tuned
SOURCE_REPORTS = ("pruning.json", "packed.json", "finetune.json")


@dataclass
class FinetuneSettings:
    """Everything that determines a fine-tuning run (all of it goes into ``finetune.json``)."""

    loss: str = "ce+squarehead"
    temperature: float = 1.0
    tokens: int | None = None
    steps: int | None = None
    lr: float = 1e-4
    batch: int = 2
    seqlen: int = 512
    warmup: int | None = None
    decay: str = "linear"
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    data: str = "pydoc"
    val_windows: int = 4
    val_every: int | None = None
    eval_windows: int = 40
    train_embeddings: bool = False
    teacher: str | None = None
    method: str = "full"  # or an adapter (npsparse.train.adapted): lora, pst, sara
    pattern: str | None = None  # PST's target sparsity ("0.5") or N:M ("2:4")
    rank: int = 8  # LoRA's and PST's rank
    fraction: float | None = None  # SaRA's trained share of each matrix
    nuclear: float = 5e-4  # SaRA's nuclear-norm weight (the reference scripts' lambda_rank)
    experts: int | None = None  # PESC's E
    top_k: int | None = None  # PESC's k
    adapter_dim: int | None = None  # PESC's R
    adapter_scale: float | None = None  # PESC's s (None: DEFAULT_SCALE)
    balance: float | None = None  # PESC's / routed FFN's balance-loss alpha (balance_weight)
    blocks: int | None = None  # routed FFN's B
    active: int | None = None  # routed FFN's A
    router_init: str | None = None  # routed FFN's routers: "random" (its default) or "oracle"

    def __post_init__(self):
        if self.method == "routed-ffn" and self.router_init is None:
            self.router_init = "random"  # recorded as such, so resume compares like with like

    def check(self) -> None:
        """Refuse impossible settings with one line (before any model is loaded)."""
        self._check_method()
        for name in ("lr", "temperature", "weight_decay", "clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NpsparseError(f"--{name.replace('_', '-')} must be a finite number, "
                                    f"got {value}")
        if self.lr <= 0:
            raise NpsparseError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise NpsparseError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if (self.tokens is None) == (self.steps is None):
            raise NpsparseError("give exactly one of --tokens N or --steps N")
        for name in ("tokens", "steps", "batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise NpsparseError(f"--{name} must be at least 1, got {value}")
        if self.seqlen < 2:
            raise NpsparseError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.val_windows < 0 or self.eval_windows < 0:
            raise NpsparseError("--val-windows and --eval-windows must be 0 or more")
        domains(self.data)  # refuses a mix of anything but named texts
        if self.warmup is not None and self.warmup < 0:
            raise NpsparseError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.warmup is not None and self.warmup > self.total_steps:
            raise NpsparseError(f"--warmup {self.warmup} is longer than the run "
                                f"({self.total_steps} steps)")
        if self.method == "pst":
            SparsitySchedule(Pattern.parse(self.pattern).sparsity).check_fits(self.total_steps)
        learning_rate(1, 1, 1.0, 0, self.decay)  # refuses an unknown decay
        LossWeights.parse(self.loss, self.temperature, self.balance_weight)

    def _check_method(self) -> None:
        """The adapter options: each method's own, in range, and no other method's."""
        if self.method not in METHODS:
            raise NpsparseError(f"unknown --method {self.method!r} ({', '.join(METHODS)})")
        if (self.pattern is not None) != (self.method == "pst"):
            raise NpsparseError("--method pst needs --sparsity S or --pattern N:M, and only it "
                                "takes them")
        if (self.fraction is not None) != (self.method == "sara"):
            raise NpsparseError("--method sara needs --fraction F, and only it takes it")
        if self.method == "pst":
            Pattern.parse(self.pattern)
        if self.method in ("lora", "pst"):
            check_rank(self.rank)
        if self.method == "sara":
            check_fraction(self.fraction)
            if not (math.isfinite(self.nuclear) and self.nuclear >= 0):
                raise NpsparseError(f"--nuclear must be 0 or more, got {self.nuclear}")
        pesc_options = (self.experts, self.top_k, self.adapter_dim, self.adapter_scale)
        if any(v is not None for v in pesc_options) != (self.method == "pesc") or (
                self.method == "pesc" and None in pesc_options[:3]):
            raise NpsparseError("--method pesc needs --experts E, --top-k K and --adapter-dim R "
                                "(--adapter-scale optional), and only it takes them")
        if self.balance is not None and self.method not in ("pesc", "routed-ffn"):
            raise NpsparseError("--balance applies to --method pesc and routed-ffn only")
        if self.method == "pesc":
            check_pesc(self.experts, self.top_k, self.adapter_dim, self.pesc.scale)
        routed = (self.blocks, self.active)
        if any(v is not None for v in routed) != (self.method == "routed-ffn") or (
                self.method == "routed-ffn" and None in routed):
            raise NpsparseError("--method routed-ffn needs --blocks B and --active A, and only "
                                "it takes them")
        if self.method == "routed-ffn":  # B dividing F is checked once the model is loaded
            check_blocks(max(self.blocks, 1), self.blocks, self.active)
        if self.method != "routed-ffn" and self.router_init is not None:
            raise NpsparseError("--router-init applies to --method routed-ffn only")
        if self.method == "routed-ffn" and self.router_init not in ROUTER_INITS:
            raise NpsparseError(f"unknown --router-init {self.router_init!r} "
                                f"({', '.join(ROUTER_INITS)})")
        if self.method != "full" and self.train_embeddings:
            raise NpsparseError("--train-embeddings applies to --method full only")

    @property
    def pesc(self) -> PescConfig | None:
        """The PESC structure ``--method pesc`` builds (defaults filled in), else None."""
        if self.method != "pesc":
            return None
        scale = DEFAULT_SCALE if self.adapter_scale is None else self.adapter_scale
        return PescConfig(self.experts, self.top_k, self.adapter_dim, scale)

    @property
    def routed_ffn(self) -> RoutedFfnConfig | None:
        """The routed-FFN structure ``--method routed-ffn`` builds, else None."""
        if self.method != "routed-ffn":
            return None
        return RoutedFfnConfig(self.blocks, self.active)

    @property
    def balance_weight(self) -> float:
        """``alpha`` of the balance loss: ``--balance``; by default 0.01 for pesc (Switch's),
        0 for routed-ffn (SPT trains without one), 0 for every other method."""
        if self.balance is not None:
            return self.balance
        return DEFAULT_BALANCE if self.method == "pesc" else 0.0

    @property
    def total_steps(self) -> int:
        """Optimizer steps: ``--steps``, or ``--tokens`` rounded up to whole batches."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch * self.seqlen))

    @property
    def warmup_steps(self) -> int:
        """``--warmup``, or by default 20 steps (the paper's scripts) but at most a tenth."""
        return self.warmup if self.warmup is not None else min(20, self.total_steps // 10)


# -- data ------------------------------------------------------------------------------------

def training_windows(source: str, tokenizer, vocab_size: int, seqlen: int) -> np.ndarray:
    """Non-overlapping windows of the training text (a named text's calibration part).

    Parameters
    ----------
    source : str
        A named text (``"pydoc"``, ``"stdlib"``), a mix (``"pydoc+stdlib"``: the first ``n``
        windows of each text, ``n`` the fewest any of them has, interleaved), a UTF-8 text
        file, or a ``.npy`` int array ``[n, seqlen]`` used as given.
    tokenizer : Tokenizer
    vocab_size : int
    seqlen : int
        Window length (a ``.npy`` must have it).

    Returns
    -------
    np.ndarray
        ``[n, seqlen]`` int64.
    """
    if str(source).endswith(".npy"):
        try:
            array = np.load(source, allow_pickle=False)
        except FileNotFoundError:
            raise NpsparseError(f"{source}: no such file") from None
        except (ValueError, OSError) as err:
            raise NpsparseError(f"{source}: not a readable .npy array ({err})") from None
        if array.ndim != 2 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.integer):
            raise NpsparseError(f"{source}: expected integer token ids [windows, seqlen], got "
                                f"{array.dtype} {list(array.shape)}")
        if array.shape[1] != seqlen:
            raise NpsparseError(f"{source}: windows of {array.shape[1]} tokens, but --seqlen is "
                                f"{seqlen}")
        if array.min() < 0 or array.max() >= vocab_size:
            raise NpsparseError(f"{source}: token ids must lie in [0, {vocab_size})")
        return array.astype(np.int64)
    groups = [make_windows(tokenizer.encode(read_text(name, part="calib")), seqlen)
              for name in domains(source)]
    share = min(len(group) for group in groups)  # a mix: as many windows of each text
    return interleave([group[:share] for group in groups])


def window_index(step: int, j: int, batch: int, n_train: int, seed: int) -> int:
    """Which training window is sequence ``j`` of optimizer step ``step`` (both 0-based).

    Sequences are numbered ``step * batch + j`` through epochs; epoch ``e`` visits the windows in
    ``default_rng([seed, e]).permutation(n_train)`` order. Nothing depends on earlier steps, so
    a resumed run reads what an uninterrupted one would.

    Parameters
    ----------
    step, j, batch, n_train, seed : int

    Returns
    -------
    int
        Row of the training windows.
    """
    k = step * batch + j
    epoch, position = divmod(k, n_train)
    return int(np.random.default_rng([seed, epoch]).permutation(n_train)[position])


def eval_texts(data: str) -> list[str]:
    """The texts a run's perplexity is measured on: pydoc, then each other named text of ``data``.

    Parameters
    ----------
    data : str
        The run's ``--data``: ``"stdlib"`` or ``"pydoc+stdlib"`` add ``"stdlib"``; a file adds
        nothing (its eval part is not defined).

    Returns
    -------
    list of str
    """
    named = [str(name) for name in domains(data) if str(name) in TEXTS]
    return ["pydoc"] + [name for name in named if name != "pydoc"]


def _perplexities(model, sets: dict, progress: bool) -> dict:
    """``{text: PerplexityResult.to_dict()}`` on each text's eval windows."""
    return {name: perplexity(model, ids, progress=progress).to_dict() for name, ids in sets.items()}


def _by_domain(before: dict, after: dict) -> dict | None:
    """``finetune.json``'s ``ppl_by_domain``: ``{text: {"before": ..., "after": ...}}``."""
    if not after:  # --eval-windows 0
        return None
    return {name: {"before": before.get(name), "after": result} for name, result in after.items()}


# -- models ----------------------------------------------------------------------------------

def load_trainable(path) -> tuple:
    """A model with writable float32 copies of its weights, plus its checkpoint and tokenizer.

    Parameters
    ----------
    path : str or Path
        ``"smollm2"``, a GGUF file, a Hugging Face folder, or a folder of ``npsparse monarch``
        (its Monarch layers get writable float32 factors; other packed folders are refused).

    Returns
    -------
    (LlamaModel, checkpoint, Tokenizer)
    """
    checkpoint = open_checkpoint(path)
    packed = getattr(checkpoint.weights, "layers", {})  # a packed folder's packed tensors
    others = {meta.get("format") for meta in packed.values()} - {"monarch", "dense"}
    if getattr(checkpoint, "head", None) is not None or others:
        raise NpsparseError(f"{path} is a packed folder; fine-tune the folder it was packed from")
    config = checkpoint.config
    if config.family != "llama":
        raise NpsparseError(f"fine-tuning supports the LLaMA family, not {config.arch}")
    weights = checkpoint.weights
    tensors = {}
    for name in weights:
        value = weights.get_checked(name, weights.shapes[name])
        if getattr(value, "TRAINABLE", False):  # Monarch factors
            tensors[name] = value.trainable_copy()
        else:  # an array, or a packed folder's dense layer
            tensors[name] = np.array(value.to_dense() if name in packed else value, np.float32)
    model = build_model(config, DictWeights(tensors, source=checkpoint.path))
    return model, checkpoint, load_tokenizer(checkpoint)


def source_report(path) -> dict | None:
    """The report of an npsparse output folder (:data:`SOURCE_REPORTS`, first found), else None.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict or None
    """
    folder = Path(path)
    for name in SOURCE_REPORTS:
        if folder.is_dir() and (folder / name).is_file():
            try:
                return json.loads((folder / name).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise NpsparseError(f"{folder / name}: unreadable ({err})") from None
    return None


def _teacher_path(model_path, settings: FinetuneSettings, report: dict | None) -> str:
    """``--teacher``, else the dense model the pruned folder names in its report."""
    if settings.teacher is not None:
        return settings.teacher
    source = (report or {}).get("teacher") or (report or {}).get("source")
    if source is None:
        raise NpsparseError(f"{model_path} names no dense model it came from; this loss needs a "
                            "teacher: pass --teacher MODEL")
    if not Path(source).exists():
        raise NpsparseError(f"the teacher {source} (named by {model_path}) does not exist here; "
                            "pass --teacher MODEL")
    return source


def _check_teacher(student_config, teacher_config, teacher: str) -> None:
    """Refuse a teacher whose shapes or vocabulary differ from the student's."""
    keys = ("arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
            "ffn_dim", "tie_embeddings")
    for key in keys:
        a, b = getattr(student_config, key), getattr(teacher_config, key)
        if a != b:
            raise NpsparseError(f"teacher {teacher} does not match the student: {key} {b} vs {a}")


def masks_of(model, report: dict | None) -> dict[str, np.ndarray]:
    """Boolean masks (``True`` = kept) of every dense block linear weight of a pruned model.

    A folder that npsparse pruned (it holds ``pruning.json``) has its zeros as the pattern; a
    dense model gets no masks (dense fine-tuning, the control). A Monarch folder's dense layers
    keep their zeros if its ``packed.json`` says so (``mask_from_zeros``: it was made from a
    pruned folder); its Monarch layers have no mask.

    Parameters
    ----------
    model : LlamaModel
    report : dict or None
        The source folder's report.

    Returns
    -------
    dict of str -> np.ndarray
    """
    if report is None or ("npsparse_packed" in report and not report.get("mask_from_zeros")):
        return {}
    return {f"{model.block_prefix(i)}.{name}.weight": layer.weight != 0
            for i, block in enumerate(model.blocks) for name, layer in block.linears.items()
            if isinstance(layer, DenseLinear)}


def _trainable_names(model, settings: FinetuneSettings) -> list[str]:
    """Block weights, norms and biases, the final norm, and the embedding if asked; PESC: the
    routers and adapters only; routed FFN: the routers and FFN weights."""
    if settings.method == "pesc":
        return pesc_names(model)
    if settings.method == "routed-ffn":
        return routed_names(model)
    return [name for name in parameters(model) if settings.train_embeddings
            or name not in ("model.embed_tokens.weight", "lm_head.weight")]


# -- evaluation ------------------------------------------------------------------------------

def validation_terms(model, teacher, windows: np.ndarray, losses: LossWeights) -> dict:
    """Mean loss terms over held-out windows, forward only.

    Parameters
    ----------
    model, teacher : LlamaModel (teacher may be None when no term needs it)
    windows : np.ndarray
        ``[n, T]`` token ids.
    losses : LossWeights

    Returns
    -------
    dict of str -> float
        ``ce`` (always, for comparison across runs), ``kd``/``squarehead`` when used, ``loss``.
    """
    sums: dict[str, float] = {}
    for ids in windows:
        outputs, h = hidden_states(model, ids)
        t_out, t_h = hidden_states(teacher, ids) if teacher is not None else (None, None)
        terms, _, _ = head_losses(h, head_of(model), ids[1:], ce=1.0, kd=losses.kd,
                                  temperature=losses.temperature, teacher_h=t_h,
                                  teacher_head=head_of(teacher) if teacher else None)
        if losses.squarehead:
            terms["squarehead"] = sum(squarehead(s, t)[0] for s, t in zip(outputs, t_out))
        terms["loss"] = (losses.ce * terms["ce"] + losses.kd * terms.get("kd", 0.0)
                         + losses.squarehead * terms.get("squarehead", 0.0))
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value / len(windows)
    return sums


def matmul_gflops(seconds: float = 0.5) -> float:
    """NumPy's float32 matmul rate on this machine now, at a training-sized product.

    Parameters
    ----------
    seconds : float
        Roughly how long to measure.

    Returns
    -------
    float
        Best GFLOP/s of ``[512, 576] @ [576, 1536]`` over repeated calls.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 576), dtype=np.float32)
    b = rng.standard_normal((576, 1536), dtype=np.float32)
    best = math.inf
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 512 * 576 * 1536 / best / 1e9


# -- resumable state -------------------------------------------------------------------------

def _resume_folder(out: Path) -> Path:
    """Where an interrupted run keeps its state: ``OUT.resume`` beside the output folder."""
    return out.with_name(out.name + ".resume")


def _save_state(folder: Path, trained: dict, optimizer: AdamW, record: dict) -> None:
    """Write what trains (:func:`_trained_state`), the moments and the record atomically."""
    from safetensors.numpy import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        arrays = {**trained, **optimizer.state()}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                  str(tmp / "state.safetensors"))
        record = {**record, "optimizer_steps": optimizer.step_count}
        (tmp / "state.json").write_text(json.dumps(record, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_state(folder: Path, settings: dict) -> tuple[dict, dict]:
    """The record and arrays :func:`_save_state` wrote, after checking the settings match."""
    from safetensors.numpy import load_file

    if not folder.is_dir():
        raise NpsparseError(f"nothing to resume: {folder} does not exist")
    try:
        record = json.loads((folder / "state.json").read_text())
        arrays = load_file(str(folder / "state.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as err:
        raise NpsparseError(f"{folder}: cannot read the resumable state ({err})") from None
    stored = record.get("settings")
    if isinstance(stored, dict) and "router_init" not in stored:  # a state from before it
        known = {k: v for k, v in stored.items() if k in FinetuneSettings.__dataclass_fields__}
        record["settings"] = {**asdict(FinetuneSettings(**known)), **stored}
    if record.get("settings") != settings:
        changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
        raise NpsparseError(f"{folder} was written with other settings ({', '.join(changed)}); "
                            "resume with the same command")
    return record, arrays


def _trained_state(params: dict, names: list[str], adapted) -> dict:
    """What trains, for the resumable state: the weights, or the adapters' state (not W_eff)."""
    if adapted is None:
        return {f"param/{n}": params[n] for n in names}
    return {f"adapter/{k}": a for k, a in adapted.state().items()}


def _restore_trained(arrays: dict, params: dict, names: list[str], adapted) -> None:
    """Put back what :func:`_trained_state` saved."""
    if adapted is None:
        for n in names:
            params[n][...] = arrays[f"param/{n}"]
    else:
        adapted.load_state({k[len("adapter/"):]: a for k, a in arrays.items()
                            if k.startswith("adapter/")})


def _new_optimizer(params: dict, names: list[str], masks: dict, adapted,
                   adam: AdamWSettings) -> AdamW:
    """AdamW on the kept weights of a full run, or on the adapters' arrays (masked inside)."""
    if adapted is None:  # PESC trains no masked weight: its masks are the frozen base's
        return AdamW({n: params[n] for n in names},
                     {n: m for n, m in masks.items() if n in names}, adam)
    return AdamW(adapted.params(), None, adam)


class _StopRequest:
    """Turns Ctrl-C and SIGTERM into a flag read between steps (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


# -- the run ---------------------------------------------------------------------------------

def finetune(model_path, out, settings: FinetuneSettings, *, resume: bool = False,
             progress: bool = True, log=print, on_step=None) -> dict:
    """Fine-tune a (pruned) model and write it as a Hugging Face folder with ``finetune.json``.

    Parameters
    ----------
    model_path : str or Path
        ``"smollm2"``, a GGUF file, a Hugging Face folder, or a folder written by
        ``npsparse prune`` (its zeros are kept: the mask is fixed).
    out : str or Path
        Output folder, written atomically when the run completes.
    settings : FinetuneSettings
    resume : bool
        Continue from the state an interrupted run left in ``OUT.resume``.
    progress : bool
        Progress bar on stderr.
    log : callable
        Where one-line notes go (interruption, resume).
    on_step : callable, optional
        Called after every optimizer step with that step's record (a dict: step, lr,
        grad_norm, seconds and the loss terms), e.g. to draw a live loss curve.

    Returns
    -------
    dict
        The contents of ``finetune.json`` (``{"interrupted": step, ...}`` if stopped early).
    """
    settings.check()
    out = Path(out).absolute()
    check_replaceable(out)
    state_dir = _resume_folder(out)
    saved = _read_state(state_dir, asdict(settings)) if resume else None  # before any loading
    if not resume and state_dir.exists():
        raise NpsparseError(f"{state_dir} holds an interrupted run: add --resume to continue it "
                            "or delete it")
    started = time.perf_counter()
    losses = LossWeights.parse(settings.loss, settings.temperature, settings.balance_weight)
    report_in = source_report(model_path)
    if settings.method != "full" and "monarch" in (report_in or {}):
        raise NpsparseError(f"--method {settings.method} adapts dense weights; {model_path} is a "
                            "Monarch folder, whose factors train with --method full")
    model, checkpoint, tokenizer = load_trainable(model_path)
    if settings.pesc is not None:  # the base arrays stay the model's; routers, adapters new
        model = with_pesc(model, settings.pesc, settings.seed)
    dense = model
    if settings.routed_ffn is not None:  # the base arrays stay the model's; routers new
        model = with_routed_ffn(model, settings.routed_ffn, settings.seed)
    config = model.config
    if settings.seqlen > config.max_position:
        raise NpsparseError(f"--seqlen {settings.seqlen} exceeds the model's context of "
                            f"{config.max_position} positions")
    teacher, teacher_name = None, None
    if losses.needs_teacher:
        teacher_name = _teacher_path(model_path, settings, report_in)
        teacher_checkpoint = open_checkpoint(teacher_name)
        _check_teacher(config, teacher_checkpoint.config, teacher_name)
        teacher = build_model(teacher_checkpoint.config, teacher_checkpoint.weights)

    data = training_windows(settings.data, tokenizer, config.vocab_size, settings.seqlen)
    n_val = settings.val_windows
    if len(data) <= n_val:
        raise NpsparseError(f"{settings.data} gives {len(data)} windows of {settings.seqlen} "
                            f"tokens: too few to train with {n_val} held out")
    train, val = data[:len(data) - n_val], data[len(data) - n_val:]
    if settings.router_init == "oracle" and saved is None:  # resumed: the state has them
        # the first FIT_WINDOWS windows the run reads, in its order (deterministic by --seed)
        fit = [train[window_index(k // settings.batch, k % settings.batch, settings.batch,
                                  len(train), settings.seed)]
               for k in range(min(FIT_WINDOWS, len(train)))]
        set_routers(model, fit_routers(dense, np.stack(fit), settings.routed_ffn))
    eval_sets = {}  # text -> [eval_windows, seqlen] windows of its eval part
    if settings.eval_windows:
        eval_sets = {name: make_windows(tokenizer.encode(read_text(name, part="eval")),
                                        settings.seqlen, settings.eval_windows)
                     for name in eval_texts(settings.data)}

    params = parameters(model)
    masks = masks_of(model, report_in)
    total, warmup = settings.total_steps, settings.warmup_steps
    adam = AdamWSettings(lr=settings.lr, weight_decay=settings.weight_decay)
    adapted = _adapted(model, params, masks, settings)  # None for full and pesc
    # the weights the engine differentiates; with adapters (dL/dW_eff) the optimizer sees the
    # adapters' arrays instead
    names = adapted.names if adapted is not None else _trainable_names(model, settings)
    record = {"settings": asdict(settings), "step": 0, "train": [], "validation": [],
              "train_seconds": 0.0, "ppl_before": None, "ppl_before_by_domain": None}
    if saved is not None:
        record, arrays = saved
        _restore_trained(arrays, params, names, adapted)  # before the optimizer: SaRA's shrink
    optimizer = _new_optimizer(params, names, masks, adapted, adam)
    record.setdefault("trainable", _optimizer_size(optimizer))  # SaRA's is the first selection's
    if saved is not None:
        optimizer.load_state(arrays, record.get("optimizer_steps", record["step"]))
        log(f"resuming {out.name} at step {record['step']} of {total}")
    if adapted is not None:
        adapted.write(params, record["step"], total)  # PST: this step's mask, recomputed
    reselect_at = adapted.reselect_step(total) if adapted is not None else None
    grads = {n: np.zeros_like(params[n]) for n in names}
    val_every = settings.val_every or max(1, total // 5)

    if eval_sets and record["ppl_before"] is None:
        record["ppl_before_by_domain"] = _perplexities(model, eval_sets, progress)
        record["ppl_before"] = record["ppl_before_by_domain"]["pydoc"]
    if not record["validation"]:
        record["validation"].append({"step": 0, **validation_terms(model, teacher, val, losses)})
    gflops = matmul_gflops()
    flops_per_token = 8 * sum(p.size for p in params.values())
    trainable = set(names)
    bar = tqdm(range(record["step"], total), desc="finetune", unit="step", disable=not progress,
               initial=record["step"], total=total)
    interrupted = False
    with _StopRequest() as stop:
        for step in bar:
            step_start = time.perf_counter()
            if step == reselect_at:  # SaRA's progressive step: fewer entries, fresh moments
                record["reselected"] = {"step": step, "frozen": adapted.reselect()}
                optimizer = _new_optimizer(params, names, masks, adapted, adam)
            for g in grads.values():
                g.fill(0)
            sums: dict[str, float] = {}
            for j in range(settings.batch):
                ids = train[window_index(step, j, settings.batch, len(train), settings.seed)]
                t = None
                if teacher is not None:
                    t_out, t_h = hidden_states(teacher, ids)
                    t = (t_out, t_h, head_of(teacher))
                terms, _ = loss_and_grads(model, ids, losses, teacher=t, trainable=trainable,
                                          into=grads, scale=1.0 / settings.batch)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value / settings.batch
            if not all(math.isfinite(v) for v in sums.values()):
                raise NpsparseError(f"the loss became {sums['loss']} at step {step + 1}; "
                                    "lower --lr")
            step_grads = grads
            if adapted is not None:
                step_grads = _adapter_gradients(adapted, grads, step, sums)
            optimizer.mask_gradients(step_grads)
            norm = clip_by_global_norm(step_grads, settings.clip)
            lr = learning_rate(step + 1, total, settings.lr, warmup, settings.decay)
            optimizer.step(step_grads, lr)
            if adapted is not None:
                adapted.write(params, step + 1, total)  # what the next forward (or eval) sees
            seconds = time.perf_counter() - step_start
            record["train_seconds"] += seconds
            record["step"] = step + 1
            record["train"].append({"step": step + 1, "lr": lr, "grad_norm": norm,
                                    "seconds": seconds, **sums})
            tok_s = settings.batch * settings.seqlen / seconds
            bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tok_s:.0f}")
            if on_step is not None:
                on_step(record["train"][-1])
            if (step + 1) % val_every == 0 or step + 1 == total:
                record["validation"].append(
                    {"step": step + 1, **validation_terms(model, teacher, val, losses)})
            if stop.requested and step + 1 < total:
                interrupted = True
                break
    bar.close()
    if interrupted:
        _save_state(state_dir, _trained_state(params, names, adapted), optimizer, record)
        log(f"interrupted after step {record['step']} of {total}; state saved in {state_dir}; "
            f"continue with the same command plus --resume")
        return {"interrupted": record["step"], "resume": str(state_dir)}

    if adapted is not None:
        adapted.merge_into(params)  # PST: the final, exact mask
    after = _perplexities(model, eval_sets, progress) if eval_sets else {}
    # a state saved before per-domain evaluation existed holds pydoc's alone
    before = record.get("ppl_before_by_domain") or {"pydoc": record["ppl_before"]}
    tokens_seen = record["step"] * settings.batch * settings.seqlen
    train_tok_s = tokens_seen / max(record["train_seconds"], 1e-9)
    report = {
        "npsparse_finetune": 1,
        "source": str(checkpoint.path),
        "teacher": teacher_name,
        "source_report": {k: report_in[k] for k in ("pattern", "settings", "source")
                          if report_in and k in report_in} or None,
        "settings": asdict(settings),
        "loss": str(losses),
        "steps": record["step"],
        "warmup_steps": warmup,
        "tokens": tokens_seen,
        "data": {"source": settings.data, "windows": int(len(data)), "train_windows": len(train),
                 "val_windows": len(val), "seqlen": settings.seqlen,
                 "token_sha256": token_hash(data)},
        "method": settings.method,
        "trainable_parameters": record["trainable"]["parameters"],
        "optimizer_state_bytes": record["trainable"]["state_bytes"],
        "masked_parameters": int(sum(int((~m).sum()) for m in masks.values())),
        "train": record["train"],
        "validation": record["validation"],
        "ppl_before": record["ppl_before"],  # pydoc's, as ppl_after
        "ppl_after": after.get("pydoc"),
        "ppl_by_domain": _by_domain(before, after),
        "train_tokens_per_s": train_tok_s,
        "flops_per_token": flops_per_token,
        "matmul_gflops": gflops,
        "matmul_fraction": train_tok_s * flops_per_token / (gflops * 1e9),
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": platform.machine(),
        "cpu": cpu_name(),
    }
    if adapted is not None:
        report.update(_adapter_report(adapted, params, record))
    if settings.pesc is not None:
        report["pesc"] = _pesc_report(model, settings, val if len(val) else train[:1])
    if settings.routed_ffn is not None:  # each block's load on the validation windows
        report["routed_ffn"] = {**asdict(settings.routed_ffn),
                                "weights": "B * softmax over all B logits, at the chosen blocks",
                                "balance": settings.balance_weight,
                                "routing": block_load(model, val if len(val) else train[:1])}
    monarch = _monarch_layers(model)
    if monarch:
        report["monarch"] = _monarch_summary(monarch)
    state = model.state_dict()
    report["weights_sha256"] = weights_digest(state)
    files = {REPORT: json.dumps(report, indent=1) + "\n"}
    if monarch:  # the trained factors, in a Monarch folder like the one read
        teacher = teacher_name or (report_in or {}).get("teacher")
        info = {"monarch": report["monarch"], "teacher": teacher, "mask_from_zeros": bool(masks)}
        save_packed(LLM(model, tokenizer, checkpoint.path), out, info, extra_files=files)
    else:
        with HFDirWriter(out) as writer:
            for i in range(config.n_layers):
                writer.add_shard(model.block_state(i))
            writer.add_shard(model.outer_state())
            writer.finish(config, tokenizer_json=tokenizer.to_json(),
                          chat_template=tokenizer.chat_template, extra_files=files)
    shutil.rmtree(state_dir, ignore_errors=True)
    return report


def _monarch_layers(model) -> dict:
    """The model's Monarch layers (trainable packed layers) by module name."""
    return {name: layer for name, layer in model.linears().items()
            if getattr(layer, "TRAINABLE", False)}


def _monarch_summary(layers: dict) -> dict:
    """What ``finetune.json`` and the output's ``packed.json`` say of the trained factors."""
    blocks = sorted({layer.blocks for layer in layers.values()})
    return {"blocks": blocks[0] if len(blocks) == 1 else blocks, "values": "fp32",
            "layers": len(layers),
            "parameters": int(sum(layer.nnz for layer in layers.values())),
            "dense_parameters": int(sum(n * k for n, k in (l.shape for l in layers.values())))}


def _adapted(model, params: dict, masks: dict, settings: FinetuneSettings):
    """Adapters on every block linear weight for ``--method lora|pst|sara``; None for full and
    pesc (its routers and adapters are the model's own arrays)."""
    if settings.method in ("full", "pesc", "routed-ffn"):
        return None
    return AdaptedModel(params, block_weight_names(model), settings.method,
                        pattern=settings.pattern, rank=settings.rank, fraction=settings.fraction,
                        nuclear=settings.nuclear, masks=masks, seed=settings.seed)


def _adapter_gradients(adapted: AdaptedModel, weight_grads: dict, step: int,
                       sums: dict) -> dict:
    """The adapters' gradients of this step; SaRA's penalty goes into the step's record."""
    grads, penalty = adapted.gradients(weight_grads, step)
    if adapted.method == "sara":
        sums["nuclear"] = penalty
    return grads


def _pesc_report(model, settings: FinetuneSettings, windows: np.ndarray) -> dict:
    """What ``finetune.json`` says of a PESC run: the structure, alpha, how the trained routers
    route the validation windows (the first training window without any)."""
    return {**asdict(settings.pesc), "balance": settings.balance_weight,
            "balance_sum": "over blocks, each alpha * E * sum_i f_i P_i",
            "trainable_arrays": len(pesc_names(model)),
            "routing": routing_summary(model, windows)}


def _optimizer_size(optimizer: AdamW) -> dict:
    """Trainable scalars and the bytes of their two AdamW moments."""
    return {"parameters": int(sum(p.size for p in optimizer.params.values())),
            "state_bytes": int(sum(a.nbytes for a in optimizer.state().values()))}


def _adapter_report(adapted: AdaptedModel, params: dict, record: dict) -> dict:
    """What ``finetune.json`` adds for an adapter run: PST's pattern as ``prune`` reports it."""
    out = {"adapter": {"method": adapted.method, "matrices": len(adapted.names)}}
    if adapted.method == "pst":
        layers = adapted.layer_sparsity(params)
        out["pattern"] = str(adapted.pattern)
        out["layers"] = layers
        out["mean_layer_sparsity"] = float(np.mean([v["sparsity"] for v in layers.values()]))
    if adapted.method == "sara":
        out["adapter"]["reselected"] = record.get("reselected")
        out["adapter"]["index_bytes"] = int(sum(a.index.nbytes
                                                for a in adapted.adapters.values()))
    return out


def weights_digest(state: dict) -> str:
    """SHA-256 over every tensor, by sorted name (name bytes, then float32 data).

    Parameters
    ----------
    state : dict of str -> np.ndarray

    Returns
    -------
    str
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + np.ascontiguousarray(state[name], np.float32).tobytes())
    return digest.hexdigest()
