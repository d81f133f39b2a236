"""Sequential, block-by-block pruning of a whole model, as the Wanda / SparseGPT / DSnoT code does it.

1. Embed the calibration windows: ``x`` [S, L, D].
2. For each decoder block in order: build it from the checkpoint, run it (dense) on every window
   while the inputs of each linear layer are accumulated into statistics, prune every linear layer
   from its own statistics, run the *pruned* block to get the next block's inputs, write the
   block's tensors to disk, and drop it.

Only one block's weights and one set of activations ``[S, L, D]`` are in memory at a time; the
checkpoint is memory-mapped (GGUF tensors are dequantized one at a time), so a model larger than
RAM can be pruned. The output is a Hugging Face folder, one safetensors shard per block, written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .calibration import calibration_shape, calibration_windows
from .data import token_hash
from .errors import NpsparseError
from .io import HFDirWriter, open_checkpoint
from .io.hf_dir import check_output_folder
from .linear import DenseLinear
from .models import build_model, select_layers
from .prune import (DSnoTOptions, InputStats, Pattern, get_method, outlier_ratio, owl_sparsities,
                    prune_layer, stats_needed, wanda_score)
from .tokenizer import load_tokenizer


@dataclass
class PruneSettings:
    """Everything that determines a pruning run (all of it is written to ``pruning.json``)."""

    method: str
    pattern: str
    base: str | None = None
    calib: str = "pydoc"
    # Calibration windows and their length; None: 32 x 512 from a text, a .npy file's own shape.
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    owl: bool = False
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    blocksize: int = 128
    percdamp: float = 0.01
    magnitude_group: str = "matrix"
    dsnot: dict = field(default_factory=lambda: asdict(DSnoTOptions()))
    # Measure each layer's reconstruction error on the calibration windows. None: yes, unless it
    # would be the only reason to run them (magnitude without OWL, which then takes seconds).
    error_report: bool | None = None
    # Prune only the linear layers these patterns select (npsparse.models.select_layers: shell
    # patterns or block prefixes); the others stay as loaded. None: every block linear layer.
    layers: list[str] | None = None


class _Recorder:
    """A linear layer that feeds its inputs to statistics before computing the product."""

    def __init__(self, inner, stats: InputStats | None):
        self.inner, self.stats, self.shape = inner, stats, inner.shape

    def __call__(self, x):
        if self.stats is not None:
            self.stats.add(x)
        return self.inner(x)


def collect_block_stats(block, inputs: np.ndarray, needs) -> tuple[dict, np.ndarray]:
    """Run ``block`` on each window of ``inputs``, accumulating its linear layers' input statistics.

    Layers in one ``block.input_groups`` entry share one statistics object. The block's layers are
    restored afterwards, also on error.

    Parameters
    ----------
    block : LlamaBlock, GPT2Block or OPTBlock
    inputs : np.ndarray
        ``[S, L, D]`` float32, the block's input for each calibration window.
    needs : collection of str
        Statistics to keep (see :class:`npsparse.prune.stats.InputStats`), e.g. ``{"hessian"}``.

    Returns
    -------
    (dict, np.ndarray)
        Layer name -> :class:`~npsparse.prune.stats.InputStats`, and the block's outputs
        ``[S, L, D]`` float32.
    """
    original = dict(block.linears)
    stats = {}
    for group in block.input_groups:
        shared = InputStats(original[group[0]].shape[1], needs)
        for i, name in enumerate(group):
            stats[name] = shared
            block.linears[name] = _Recorder(original[name], shared if i == 0 else None)
    try:
        outputs = np.stack([block(x, 0) for x in inputs])
    finally:
        block.linears.update(original)
    return stats, outputs


def prune_model(model_path, out: str | Path, settings: PruneSettings, *,
                progress: bool = True) -> dict:
    """Prune a checkpoint block by block and write the result as a Hugging Face folder.

    Parameters
    ----------
    model_path : str or Path
        ``"smollm2"``, a GGUF file or a Hugging Face folder.
    out : str or Path
        Output folder (``config.json``, safetensors shards with the zeros in place,
        ``tokenizer.json``, ``pruning.json``); written atomically. Refused before any work if it
        is the model or inside it, or exists and npsparse did not write it
        (:func:`npsparse.io.hf_dir.check_output_folder`).
    settings : PruneSettings
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    dict
        The contents of ``pruning.json``: settings, per-matrix sparsity and reconstruction error,
        per-block sparsity, timings, peak RSS and the calibration token hash.
    """
    settings, pattern = _checked(settings)
    dsnot_options = DSnoTOptions(**settings.dsnot)  # refuses a bad guard before any work
    needs = stats_needed(settings.method, settings.base, error=settings.error_report)
    calibrate = bool(needs) or settings.owl  # else no calibration window is ever read
    check_output_folder(out, inputs=[model_path, settings.calib])  # before minutes of work
    started = time.perf_counter()
    checkpoint = open_checkpoint(model_path)
    config = checkpoint.config
    tokenizer = load_tokenizer(checkpoint)
    model = build_model(config, checkpoint.weights, load_blocks=False)
    first = model.load_block(0).linears
    chosen = set(select_layers([f"{model.block_prefix(i)}.{name}" for i in range(config.n_layers)
                                for name in first], settings.layers))  # refuses before any work
    if pattern.structured:  # refuse impossible N:M widths before any work is done
        for name, layer in first.items():
            pattern.check_width(layer.shape[1], f"{model.block_prefix(0)}.{name}")
    calib, x = None, None
    if calibrate:
        calib = calibration_windows(settings.calib, tokenizer, config.vocab_size,
                                    nsamples=settings.nsamples, seqlen=settings.seqlen,
                                    seed=settings.seed)
        x = np.stack([model.embed(ids, 0) for ids in calib])  # [S, L, D]
    block_sparsity, ratios = [pattern.sparsity] * config.n_layers, None
    if settings.owl:
        ratios = _owl_ratios(model, x, settings.owl_m, progress)
        block_sparsity = owl_sparsities(ratios, pattern.sparsity, settings.owl_lambda).tolist()

    layers, blocks = {}, []
    digest = hashlib.sha256()  # of every pruned block tensor, in order: the determinism check
    with HFDirWriter(out) as writer:
        for i in tqdm(range(config.n_layers), desc=f"prune {settings.method}", unit="block",
                      disable=not progress):
            block_start = time.perf_counter()
            layer_pattern = pattern if pattern.structured else Pattern(block_sparsity[i])
            block, x = _prune_block(model, i, x, needs, layer_pattern, settings, dsnot_options,
                                    layers, chosen)
            state = model.block_state(i, block)
            for name in sorted(state):
                digest.update(name.encode() + np.ascontiguousarray(state[name]).tobytes())
            writer.add_shard(state)
            blocks.append({"block": i, "target_sparsity": block_sparsity[i],
                           "seconds": time.perf_counter() - block_start})
            del block
        writer.add_shard(model.outer_state())
        report = _report(settings, pattern, layers, blocks, ratios, calib, checkpoint,
                         time.perf_counter() - started, digest.hexdigest())
        writer.finish(config, tokenizer_json=tokenizer.to_json(),
                      chat_template=tokenizer.chat_template,
                      extra_files={"pruning.json": json.dumps(report, indent=1) + "\n"})
    return report


def _checked(settings: PruneSettings) -> tuple[PruneSettings, Pattern]:
    """The settings with their defaults resolved, and the pattern; refuses impossible ones."""
    pattern = Pattern.parse(settings.pattern)
    method = get_method(settings.method)  # refuses an unknown name
    nsamples, seqlen = calibration_shape(settings.calib, settings.nsamples, settings.seqlen)
    settings = replace(settings, nsamples=nsamples, seqlen=seqlen)
    if settings.error_report is None:
        settings = replace(settings, error_report=bool(method.needs) or settings.owl)
    if settings.base is not None and not method.takes_base:
        raise NpsparseError(f"--base is DSnoT's initial method; {settings.method} takes none")
    if settings.owl and pattern.structured:
        raise NpsparseError("OWL allocates unstructured sparsity; it cannot be combined with N:M")
    return settings, pattern


def _prune_block(model, i: int, x, needs, pattern: Pattern, settings: PruneSettings,
                 dsnot_options: DSnoTOptions, layers: dict, chosen: set):
    """Block ``i`` with its ``chosen`` layers pruned (their reports added to ``layers``) and, when
    calibrating, its outputs on ``x`` ``[S, L, D]``, which the next block calibrates on."""
    block = model.load_block(i)
    prune = [name for name in block.linears if f"{model.block_prefix(i)}.{name}" in chosen]
    stats = collect_block_stats(block, x, needs)[0] if x is not None and prune else {}
    for name in prune:
        layer = block.linears[name]
        new, _, info = prune_layer(
            settings.method, layer.to_dense(), stats.get(name), pattern, base=settings.base,
            magnitude_group=settings.magnitude_group, blocksize=settings.blocksize,
            percdamp=settings.percdamp, dsnot_options=dsnot_options)
        block.linears[name] = DenseLinear(new)
        layers[f"{model.block_prefix(i)}.{name}"] = info
    if x is not None:  # the pruned block's outputs feed the next
        x = np.stack([block(xs, 0) for xs in x])
        if not np.all(np.isfinite(x)):
            raise NpsparseError(f"block {i} produced NaN or infinite activations after pruning")
    return block, x


def _owl_ratios(model, x: np.ndarray, m: float, progress: bool) -> list[float]:
    """OWL's dense pass: each block's outlier ratio of Wanda scores on the dense model."""
    ratios = []
    for i in tqdm(range(model.config.n_layers), desc="OWL outliers", unit="block",
                  disable=not progress):
        block = model.load_block(i)
        stats, x = collect_block_stats(block, x, ("sq",))
        scores = [wanda_score(layer.to_dense(), stats[name].sq_norm)
                  for name, layer in block.linears.items()]
        ratios.append(outlier_ratio(scores, m))
    return ratios


def _report(settings, pattern, layers, blocks, ratios, calib, checkpoint, seconds,
            weights_digest) -> dict:
    return {
        "npsparse_pruning": 1,
        "source": str(checkpoint.path),
        "source_sha256_head": _file_digest(checkpoint.path),
        "settings": asdict(settings),
        "pattern": str(pattern),
        "calibration": None if calib is None else {
            "windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
            "token_sha256": token_hash(calib)},
        "mean_layer_sparsity": float(np.mean([v["sparsity"] for v in layers.values()])),
        "layers": layers,
        "weights_sha256": weights_digest,
        "blocks": blocks,
        "owl_outlier_ratios": ratios,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": platform.machine(),
    }


def _file_digest(path: Path) -> str:
    """SHA-256 of the first 16 MiB of a file (or of a folder's config.json): names the source."""
    path = Path(path)
    target = path / "config.json" if path.is_dir() else path
    with open(target, "rb") as handle:
        return hashlib.sha256(handle.read(16 * 2**20)).hexdigest()
