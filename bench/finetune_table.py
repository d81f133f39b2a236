"""Recovery of pruned SmolLM2 by sparse fine-tuning, every arm on the same token budget.

    python bench/finetune_table.py --pruned-root DIR [--out-root DIR] [--tokens N] [--only NAME ...]
    python bench/finetune_table.py --pruned-root DIR --out-root DIR --table    # print, run nothing

Rows: SparseGPT 2:4 and 70% (and Wanda 50%), each fine-tuned with cross-entropy only,
cross-entropy + SquareHead and SquareHead only; plus dense cross-entropy fine-tuning on the same
tokens (the control). Adapter arms (issue 14, ``--method``): PST dense -> 50% and -> 2:4 at rank
8 (4.9% of the block parameters train), SaRA on the dense model and on SparseGPT 50% against LoRA
rank 8 with the same trainable count (2,442,240: SaRA trains 2.3% of the dense model's block
weights, 4.6% of the kept half of the pruned one), and full fine-tuning of SparseGPT 50% with CE
and CE+SquareHead beside them. Monarch arms (issue 15): the last 10 MLPs projected onto 4-block
Monarch matrices against SparseGPT 50% of the same layers, both CE + SquareHead. The source
folders are ``DIR/NAME`` for each name of ``PRUNED`` (made by ``npsparse prune`` or ``npsparse
monarch`` as ``PRUNED`` says); a missing one is made first. Each arm runs ``npsparse finetune``
in its own process (its peak RSS is its own) with
``--eval-windows 40`` (perplexity on the first 40 x 512 eval tokens before and after) and is
appended to ``OUT/results.jsonl`` as it finishes; an arm already there is not run again. The
table reports the fraction of the log-perplexity gap closed, ``(log p_before - log p_after) /
(log p_before - log p_dense)``, with the dense model before fine-tuning as the reference, and the
dense control's own change beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

LAST10_MLP = "model.layers.2?.mlp.*"  # the MLPs of blocks 20-29, SmolLM2's last 10
# How each source folder is made: the npsparse command after "npsparse" and before "--out".
PRUNED = {"sparsegpt-2of4": ["prune", "smollm2", "--method", "sparsegpt", "--pattern", "2:4"],
          "sparsegpt-0.7": ["prune", "smollm2", "--method", "sparsegpt", "--sparsity", "0.7"],
          "wanda-0.5": ["prune", "smollm2", "--method", "wanda", "--sparsity", "0.5"],
          "sparsegpt-0.5": ["prune", "smollm2", "--method", "sparsegpt", "--sparsity", "0.5"],
          "sparsegpt-0.5-last10mlp": ["prune", "smollm2", "--method", "sparsegpt", "--sparsity",
                                      "0.5", "--layers", LAST10_MLP],
          "monarch-b4-last10mlp": ["monarch", "smollm2", "--blocks", "4", "--layers",
                                   LAST10_MLP]}
LOSSES = ("ce+squarehead", "ce", "squarehead")
# Peak learning rates: higher for the more damaged models (a fixed choice, not tuned on the eval
# windows; the rows in bench/results were run with these values).
LR = {"sparsegpt-2of4": 2e-4, "sparsegpt-0.7": 1.6e-4, "wanda-0.5": 6e-5, "dense": 6e-5,
      "sparsegpt-0.5": 6e-5}
# Adapter arms: (row name, source, loss, finetune options, peak learning rate). The learning
# rate is a fixed choice for small trainable sets (LoRA's usual 2e-4), not tuned on eval windows.
METHOD_ARMS = [
    ("dense/pst-0.5/ce", "dense", "ce", ["--method", "pst", "--sparsity", "0.5", "--rank", "8"],
     2e-4),
    ("dense/pst-2of4/ce", "dense", "ce", ["--method", "pst", "--pattern", "2:4", "--rank", "8"],
     2e-4),
    ("dense/sara/ce", "dense", "ce", ["--method", "sara", "--fraction", "0.023"], 2e-4),
    ("dense/lora-8/ce", "dense", "ce", ["--method", "lora", "--rank", "8"], 2e-4),
    ("sparsegpt-0.5/sara/ce", "sparsegpt-0.5", "ce", ["--method", "sara", "--fraction", "0.046"],
     2e-4),
    ("sparsegpt-0.5/lora-8/ce", "sparsegpt-0.5", "ce", ["--method", "lora", "--rank", "8"], 2e-4),
    ("sparsegpt-0.5/ce", "sparsegpt-0.5", "ce", [], LR["sparsegpt-0.5"]),
    ("sparsegpt-0.5/ce+squarehead", "sparsegpt-0.5", "ce+squarehead", [], LR["sparsegpt-0.5"]),
]
# Monarch recovery (issue 15): the last 10 MLPs as 4-block Monarch matrices (34.4% of their
# weights), every factor and every other weight training, against SparseGPT 50% of the same
# layers; CE + SquareHead, the dense teacher. Learning rate by damage, as above: the Monarch
# projection moves these layers far more than SparseGPT 50% does.
MONARCH_ARMS = [
    ("monarch-b4-last10mlp/ce+squarehead", "monarch-b4-last10mlp", "ce+squarehead", [], 2e-4),
    ("sparsegpt-0.5-last10mlp/ce+squarehead", "sparsegpt-0.5-last10mlp", "ce+squarehead", [],
     6e-5),
]


def arms() -> list[tuple[str, str, str, list[str], float]]:
    """(row name, pruned folder name or 'dense', loss, options, lr), most telling first, so that a
    run cut short still has the rows the comparison needs: both SquareHead rows, CE at 70%, the
    control; then Wanda and the adapter arms."""
    out = [("sparsegpt-2of4/ce+squarehead", "sparsegpt-2of4", "ce+squarehead"),
           ("sparsegpt-0.7/ce+squarehead", "sparsegpt-0.7", "ce+squarehead"),
           ("sparsegpt-0.7/ce", "sparsegpt-0.7", "ce"),
           ("dense/ce", "dense", "ce"),
           ("sparsegpt-2of4/ce", "sparsegpt-2of4", "ce"),
           ("sparsegpt-0.7/squarehead", "sparsegpt-0.7", "squarehead"),
           ("sparsegpt-2of4/squarehead", "sparsegpt-2of4", "squarehead")]
    out += [(f"wanda-0.5/{loss}", "wanda-0.5", loss) for loss in LOSSES]
    out = [(name, source, loss, [], LR[source]) for name, source, loss in out]
    return out + METHOD_ARMS + MONARCH_ARMS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned-root", type=Path, required=True)
    parser.add_argument("--out-root", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens per arm")
    parser.add_argument("--only", nargs="*", help="run only these rows")
    parser.add_argument("--table", action="store_true",
                        help="print the table of the rows already in OUT/results.jsonl, run nothing")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply every arm's learning rate (the scripts' values) by this")
    args = parser.parse_args(argv)
    args.out_root.mkdir(parents=True, exist_ok=True)
    results = args.out_root / "results.jsonl"
    for name, source, loss, options, lr in arms():
        if args.table or name in read(results) or (args.only and name not in args.only):
            continue
        model = "smollm2" if source == "dense" else str(args.pruned_root / source)
        if source != "dense" and not Path(model).is_dir():
            subprocess.run([sys.executable, "-m", "npsparse.cli", *PRUNED[source], "--out", model],
                           check=True)
        out = args.out_root / name.replace("/", "__")
        lr = lr * args.lr_scale
        command = [sys.executable, "-m", "npsparse.cli", "finetune", model, "--loss", loss,
                   "--tokens", str(args.tokens), "--lr", repr(lr), "--eval-windows", "40",
                   *options, "--out", str(out), "--json"]
        if loss != "ce":
            command += ["--teacher", "smollm2"]
        print(f"== {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((out / "finetune.json").read_text())
        row = {"name": name, "source": source, "loss": loss, "lr": lr,
               **{k: report[k] for k in ("tokens", "steps", "ppl_before", "ppl_after",
                                         "validation", "train_tokens_per_s", "matmul_gflops",
                                         "matmul_fraction", "seconds", "peak_rss_mib",
                                         "weights_sha256", "trainable_parameters",
                                         "masked_parameters", "cpu")},
               "method": report.get("method", "full"), "options": options,
               "optimizer_state_bytes": report.get("optimizer_state_bytes"),
               "mean_layer_sparsity": report.get("mean_layer_sparsity"),
               "median_step_tokens_per_s": median_step_rate(report)}
        with open(results, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    print(table(read(results)))
    return 0


def median_step_rate(report: dict) -> float:
    """Training tokens/s of the median optimizer step (robust to minutes when the shared machine
    was busy, unlike the run's mean, ``train_tokens_per_s``)."""
    seconds = sorted(step["seconds"] for step in report["train"])
    tokens = report["settings"]["batch"] * report["settings"]["seqlen"]
    return tokens / seconds[len(seconds) // 2]


def method_label(row: dict) -> str:
    """``full`` or the adapter and its target, e.g. ``pst --pattern 2:4 --rank 8``."""
    options = row.get("options") or []
    return " ".join(options).replace("--method ", "") if options else row.get("method", "full")


def optimizer_mib(row: dict) -> str:
    """AdamW's two moments in MiB (rows run before it was recorded: 8 bytes per parameter)."""
    state = row.get("optimizer_state_bytes") or 8 * row["trainable_parameters"]
    return f"{state / 2**20:.1f}"


def read(path: Path) -> dict:
    """Rows of ``results.jsonl`` by name."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["name"]: row for row in rows}


def table(rows: dict) -> str:
    """The markdown table of every finished arm.

    Two gap fractions: against the dense model before fine-tuning, and against the dense control
    after the same fine-tuning (the text is in-domain, so the control improves too; a pruned
    model can only be expected to close the gap to what the dense model reaches itself).
    """
    if not rows:
        return "(no rows yet)"
    control = next((r for r in rows.values() if r["source"] == "dense"), None)

    def closed(before: float, after: float, reference: float | None) -> str:
        if reference is None:
            return "-"
        return f"{(math.log(before) - math.log(after)) / (math.log(before) - math.log(reference)):.0%}"

    dense = control["ppl_before"]["ppl"] if control else None
    dense_ft = control["ppl_after"]["ppl"] if control else None
    lines = ["| model | loss | tokens | lr | ppl before | ppl after | gap closed (dense) | gap closed "
             "(dense control) | val CE before -> after | train tok/s (mean, median step) | "
             "% of matmul (mean, median step) | peak RSS MiB | method | trainable | "
             "optimizer MiB | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        before, after = row["ppl_before"]["ppl"], row["ppl_after"]["ppl"]
        sparse = row["source"] != "dense"
        v0, v1 = row["validation"][0]["ce"], row["validation"][-1]["ce"]
        median_fraction = (row["matmul_fraction"] * row.get("median_step_tokens_per_s", math.nan)
                           / row["train_tokens_per_s"])  # same FLOPs per token, same matmul probe
        lines.append(f"| {row['source']} | {row['loss']} | {row['tokens']} | {row['lr']:g} | "
                     f"{before:.2f} | {after:.2f} | "
                     f"{closed(before, after, dense) if sparse else '-'} | "
                     f"{closed(before, after, dense_ft) if sparse else '-'} | "
                     f"{v0:.3f} -> {v1:.3f} | {row['train_tokens_per_s']:.1f}, "
                     f"{row.get('median_step_tokens_per_s', float('nan')):.1f} | "
                     f"{100 * row['matmul_fraction']:.0f}%, {100 * median_fraction:.0f}% | "
                     f"{row['peak_rss_mib']:.0f} | {method_label(row)} | "
                     f"{row['trainable_parameters']:,} | {optimizer_mib(row)} | "
                     f"{cpu_label(row['cpu'])} |")
    return "\n".join(lines) + "\n\nPerplexity on the first 40 x 512 eval tokens."


def cpu_label(cpu: str) -> str:
    """A short CPU name for the table ("AMD EPYC", "Intel Xeon")."""
    return cpu.replace("(R)", "").replace(" Processor", "").strip()


if __name__ == "__main__":
    sys.exit(main())
