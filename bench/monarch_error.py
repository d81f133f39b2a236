"""How far every SmolLM2 block linear is from its Monarch projection, beside low rank and magnitude
pruning with the same parameter count (issue 15, first must-show).

    OPENBLAS_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/monarch_error.py [--windows 8]
        [--seqlen 512] [--seed 0] [--blocks 2 4 8] [--jsonl bench/results/monarch_error.jsonl]
        [--plot bench/results/monarch_error.png]

One OpenBLAS thread: the work is hundreds of small SVDs and products, and with another process
busy on the 2 cores, two threads made a 576 x 1536 float64 SVD 20x slower (5.4 s against 0.26 s).

For each of the 30 blocks x 7 linears (q, k, v, o, gate, up, down) of the dense model and each b,
three approximations ``A`` of ``W [N, K]`` with the same number of stored values, the Monarch
parameter count ``q (N + K)``, ``q = min(N, K) / b``:

- ``monarch``: the projection (:func:`npsparse.kernels.monarch.project_factors`, the closest
  b-block Monarch matrix in Frobenius norm);
- ``low_rank``: truncated SVD of rank ``floor(params / (N + K))``, which is exactly ``q``;
- ``magnitude``: the ``params`` weights of largest ``|w|`` kept, the rest zero (unstructured,
  one threshold per matrix). The positions are not counted: a real sparse format pays index
  bytes on top, so this baseline is favoured. For a square matrix at b = 2 the Monarch count
  equals ``N K``, so magnitude keeps every weight there (error 0) and the low rank is ``N / 2``.

Two errors per approximation: ``||W - A||_F / ||W||_F``, and the output error
``||X W^T - X A^T||_F / ||X W^T||_F`` on the layer's calibration inputs ``X [T, K]``, computed
exactly from ``G = X^T X`` as ``sqrt(tr(E G E^T) / tr(W G W^T))``, ``E = W - A``. ``X`` is what
the layer sees in the dense model on ``--windows`` windows of ``--seqlen`` tokens drawn (seed
``--seed``) from the calibration part of the default text: block ``i``'s inputs come from the
dense blocks before it (:func:`npsparse.sequential.collect_block_stats`, the pruner's loop).
Everything after loading runs in float64 (the weights are SmolLM2's Q4_1 values, dequantized).

Writes one JSON row per matrix, b and method (with the CPU and the command), prints a table per
matrix type and b (mean and worst over the 30 blocks) and plots output error against b.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from npsparse.calibration import calibration_windows
from npsparse.data import token_hash
from npsparse.io import open_checkpoint
from npsparse.kernels.monarch import monarch_dense, monarch_sizes, project_factors
from npsparse.models import build_model
from npsparse.prune.patterns import lowest_mask
from npsparse.roofline import cpu_name
from npsparse.sequential import collect_block_stats
from npsparse.tokenizer import load_tokenizer

METHODS = ("monarch", "low_rank", "magnitude")
LABELS = {"monarch": "Monarch", "low_rank": "low rank (SVD)", "magnitude": "magnitude"}
COLORS = {"monarch": "tab:blue", "low_rank": "tab:orange", "magnitude": "tab:green"}


def relative_errors(weight: np.ndarray, approx: np.ndarray,
                    gram: np.ndarray) -> tuple[float, float]:
    """``||W - A||_F / ||W||_F`` and ``||X (W - A)^T||_F / ||X W^T||_F`` from ``G = X^T X``."""
    error = weight - approx  # [N, K]
    frobenius = np.linalg.norm(error) / np.linalg.norm(weight)
    out_error = np.sum((error @ gram) * error)  # tr(E G E^T) = ||X E^T||_F^2
    out_weight = np.sum((weight @ gram) * weight)  # ||X W^T||_F^2
    return float(frobenius), float(np.sqrt(max(out_error, 0.0) / out_weight))


def approximations(weight: np.ndarray, blocks: int, svd) -> tuple[int, dict]:
    """The Monarch parameter count at ``b`` and the three approximations ``[N, K]`` float64."""
    n, k = weight.shape
    u, sv, vt = svd  # [N, m], [m], [m, K]
    params = monarch_sizes(weight.shape, blocks).parameters  # q (N + K)
    rank = params // (n + k)
    keep = lowest_mask(np.abs(weight), weight.size - params)  # [N, K] True = kept
    return params, {
        "monarch": monarch_dense(*project_factors(weight, blocks)),
        "low_rank": (u[:, :rank] * sv[:rank]) @ vt[:rank],
        "magnitude": np.where(keep, weight, 0.0),
    }


def matrix_rows(name: str, weight: np.ndarray, gram: np.ndarray, blocks_list) -> list[dict]:
    """One row per b and method for one linear layer (``weight`` float64 ``[N, K]``)."""
    n, k = weight.shape
    svd = np.linalg.svd(weight, full_matrices=False)  # once, every rank reads it
    rows = []
    for blocks in blocks_list:
        params, approx = approximations(weight, blocks, svd)
        for method in METHODS:
            frobenius, output = relative_errors(weight, approx[method], gram)
            rows.append({"name": name, "matrix": name.rsplit(".", 1)[-1], "shape": [n, k],
                         "blocks": blocks, "method": method, "parameters": params,
                         "density": params / (n * k),
                         "rank": params // (n + k) if method == "low_rank" else None,
                         "frobenius_rel": frobenius, "output_rel": output})
    return rows


def measure(args) -> tuple[list[dict], dict]:
    """Every block linear's rows, and the calibration's description."""
    checkpoint = open_checkpoint(args.model)
    config = checkpoint.config
    model = build_model(config, checkpoint.weights, load_blocks=False)
    ids = calibration_windows("pydoc", load_tokenizer(checkpoint), config.vocab_size,
                              nsamples=args.windows, seqlen=args.seqlen, seed=args.seed)
    calibration = {"source": "pydoc calib part", "windows": int(ids.shape[0]),
                   "seqlen": int(ids.shape[1]), "tokens": int(ids.size), "seed": args.seed,
                   "token_sha256": token_hash(ids)}
    x = np.stack([model.embed(w, 0) for w in ids])  # [S, L, D]
    rows = []
    for i in range(config.n_layers):
        start = time.perf_counter()
        block = model.load_block(i)
        stats, x = collect_block_stats(block, x, {"hessian"})  # x: the dense block's outputs
        forward = time.perf_counter() - start
        for name, layer in block.linears.items():
            weight = layer.to_dense().astype(np.float64)  # [N, K]
            rows += [{"block": i, **row} for row in
                     matrix_rows(f"{model.block_prefix(i)}.{name}", weight, stats[name].xtx,
                                 args.blocks)]
        print(f"block {i:2d}: forward + X^T X {forward:5.1f} s, errors "
              f"{time.perf_counter() - start - forward:5.1f} s", file=sys.stderr, flush=True)
    return rows, calibration


def summary(rows: list[dict], blocks_list) -> str:
    """Markdown table: per matrix type and b, mean (worst) of both errors for each method."""
    matrices = list(dict.fromkeys(r["matrix"] for r in rows)) + ["all"]
    head = ("| matrix | N x K | b | params | "
            + " | ".join(f"output {LABELS[m]}" for m in METHODS) + " | "
            + " | ".join(f"Frobenius {LABELS[m]}" for m in METHODS) + " |")
    lines = [head, "|---" * (4 + 2 * len(METHODS)) + "|"]
    for blocks in blocks_list:
        for matrix in matrices:
            chosen = [r for r in rows if r["blocks"] == blocks
                      and matrix in ("all", r["matrix"])]
            by_method = {m: [r for r in chosen if r["method"] == m] for m in METHODS}
            first = by_method["monarch"][0]
            shape = "mixed" if matrix == "all" else "x".join(map(str, first["shape"]))
            density = (sum(r["parameters"] for r in by_method["monarch"])
                       / sum(r["shape"][0] * r["shape"][1] for r in by_method["monarch"]))
            cells = [_mean_worst(by_method[m], "output_rel") for m in METHODS]
            cells += [_mean_worst(by_method[m], "frobenius_rel") for m in METHODS]
            lines.append(f"| {matrix} | {shape} | {blocks} | {100 * density:.1f}% | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_worst(rows: list[dict], key: str) -> str:
    values = np.array([r[key] for r in rows])
    return f"{values.mean():.3f} ({values.max():.3f})"


def plot(rows: list[dict], blocks_list, path: Path, calibration: dict) -> None:
    """Output error against b, one panel per matrix type: mean over blocks (line), min..max
    (band); the mean Frobenius error dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrices = list(dict.fromkeys(r["matrix"] for r in rows))
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.6), sharey=True)
    for ax, matrix in zip(axes.flat, matrices):
        shape = next(r["shape"] for r in rows if r["matrix"] == matrix)
        for method in METHODS:
            cells = [[r for r in rows if r["matrix"] == matrix and r["method"] == method
                      and r["blocks"] == b] for b in blocks_list]
            out = [np.array([r["output_rel"] for r in cell]) for cell in cells]
            frob = [np.mean([r["frobenius_rel"] for r in cell]) for cell in cells]
            ax.plot(blocks_list, [o.mean() for o in out], "o-", color=COLORS[method],
                    label=f"{LABELS[method]}: output error (mean, band min..max)")
            ax.fill_between(blocks_list, [o.min() for o in out], [o.max() for o in out],
                            color=COLORS[method], alpha=0.12, linewidth=0)
            ax.plot(blocks_list, frob, "--", color=COLORS[method], linewidth=1,
                    label=f"{LABELS[method]}: Frobenius error (mean)")
        density = [monarch_sizes(shape, b).parameters / (shape[0] * shape[1])
                   for b in blocks_list]
        ax.set_title(f"{matrix}  [{shape[0]} x {shape[1]}]", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(blocks_list, [f"{b}\n{100 * d:.0f}%" for b, d in zip(blocks_list, density)])
        ax.grid(alpha=0.3)
    top = max(max(r["output_rel"], r["frobenius_rel"]) for r in rows)
    axes[0, 0].set_ylim(0, 1.02 * max(top, 1.0))  # shared by every panel
    for ax in axes[-1]:
        ax.set_xlabel("b  (parameters / dense)")
    for ax in axes[:, 0]:
        ax.set_ylabel("relative error")
    legend_ax = axes.flat[len(matrices)]
    legend_ax.axis("off")
    legend_ax.legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=8.5,
                     frameon=False)
    fig.suptitle(f"SmolLM2-135M block linears (30 blocks each): error of the Monarch projection, "
                 f"truncated SVD and magnitude pruning at the Monarch parameter count\noutput "
                 f"error ||XW^T - XA^T|| / ||XW^T|| on {calibration['tokens']:,} calibration "
                 f"tokens ({calibration['windows']} x {calibration['seqlen']}) of each layer's "
                 f"dense-model inputs; magnitude ignores index overhead", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--jsonl", type=Path, default=Path("bench/results/monarch_error.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/monarch_error.png"))
    args = parser.parse_args(argv)
    command = "python " + shlex.join(sys.argv if argv is None else [__file__, *argv])
    start = time.perf_counter()
    rows, calibration = measure(args)
    seconds = time.perf_counter() - start
    extra = {"calibration": calibration, "cpu": cpu_name(), "seconds": round(seconds, 1),
             "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "command": command}
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(args.jsonl, "w") as handle:
        for row in rows:
            handle.write(json.dumps({**row, **extra}) + "\n")
    plot(rows, args.blocks, args.plot, calibration)
    print(f"SmolLM2-135M-Instruct block linears, {len(rows) // (len(METHODS) * len(args.blocks))} "
          f"matrices; mean (worst) over blocks of the relative errors; output error on "
          f"{calibration['tokens']} calibration tokens ({calibration['windows']} windows x "
          f"{calibration['seqlen']}, seed {calibration['seed']}); params = Monarch parameters "
          f"/ dense, shared by all three methods (magnitude: index overhead not counted)\n")
    print(summary(rows, args.blocks))
    print(f"\n{seconds:.0f} s on {extra['cpu']}; rows: {args.jsonl}, plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
