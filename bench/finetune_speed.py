"""What each fine-tuning method costs, full fine-tuning, LoRA, SaRA and PST measured side by side
in one run (issue 14).

    python bench/finetune_speed.py --save    # SmolLM2: full, LoRA 8, SaRA 2.3%, PST 50% rank 8

    python bench/finetune_speed.py [--model smollm2] [--source DIR] [--methods full lora sara pst]
        [--steps 4] [--rounds 2] [--batch 2] [--seqlen 512] [--save [--jsonl FILE]]

The recovery arms of ``bench/finetune_table.py`` ran on different days, so their tokens/s do not
compare; here every method runs in the same session. Each run is one ``npsparse finetune MODEL
--loss ce --steps S --eval-windows 0 --method ...`` process (so its peak RSS is its own), with
validation on one held-out window only before the first step and after the last (not timed).
The runs are interleaved in rounds (round 1: full, lora, sara, pst; round 2: the same order), so
a slow minute of the shared machine does not land on one method only. ``--source DIR`` runs the
same methods on a pruned folder as well, except PST, which only prunes a dense model.

From each run's ``finetune.json``: the trainable parameters and the bytes of their two AdamW
moments (SaRA's from its first selection), peak RSS, the CPU and NumPy's float32 matmul rate,
and the seconds of every optimizer step. A run's step tok/s is the median over its steps after
the first (step 1 is the first backward and the first touch of the gradient and moment buffers;
its own column shows what that costs); the table gives the best and the median of those over the
rounds, and both as a ratio to full fine-tuning of the same model in this run. PST's mask update
is inside every step's time; SaRA's one re-selection falls in step S/2 + 1 only, which the
median passes over (its seconds are in the saved rows).
The % of block weights counts the 7 x layers linear weights (zeros of a pruned folder too);
full fine-tuning also trains the norms, and on a pruned folder its optimizer holds the zeros too.

Outputs go to a temporary folder, removed at the end. ``--save`` appends one JSON row per model
and method to ``bench/results/finetune_speed.jsonl`` (per-round figures, the CPU, the command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from npsparse.io import open_checkpoint
from npsparse.models import expected_shapes

# name -> the finetune options of that method; rank 8 LoRA and SaRA at 2.3% train the same
# number of SmolLM2 block weights (2,442,240), PST rank 8 trains 4.9%
METHODS = {"full": [],
           "lora": ["--method", "lora", "--rank", "8"],
           "sara": ["--method", "sara", "--fraction", "0.023"],
           "pst": ["--method", "pst", "--sparsity", "0.5", "--rank", "8"],
           "pst-2of4": ["--method", "pst", "--pattern", "2:4", "--rank", "8"]}
DENSE_ONLY = ("pst", "pst-2of4")
RESULTS = Path(__file__).parent / "results" / "finetune_speed.jsonl"


def finetune_command(model: str, method: str, args, out: Path) -> list[str]:
    """The ``npsparse finetune`` process of one run."""
    return [sys.executable, "-m", "npsparse.cli", "finetune", model, "--loss", "ce",
            "--steps", str(args.steps), "--batch", str(args.batch), "--seqlen", str(args.seqlen),
            "--eval-windows", "0", "--val-windows", "1", "--val-every", str(args.steps),
            *METHODS[method], "--out", str(out), "--json"]


def run_once(model: str, method: str, args, out: Path) -> dict:
    """Run one fine-tuning process and keep what the table needs from its ``finetune.json``."""
    command = finetune_command(model, method, args, out)
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {model} failed (exit {done.returncode}): "
                         f"{shlex.join(command)}")
    report = json.loads((out / "finetune.json").read_text())
    shutil.rmtree(out)  # a SmolLM2 folder is 0.5 GB; keep one at a time
    tokens = report["settings"]["batch"] * report["settings"]["seqlen"]
    seconds = [step["seconds"] for step in report["train"]]
    return {"step_seconds": seconds,
            "step_tok_s": tokens / statistics.median(seconds[1:]),
            "first_step_tok_s": tokens / seconds[0],
            "trainable_parameters": report["trainable_parameters"],
            "optimizer_state_bytes": report["optimizer_state_bytes"],
            "peak_rss_mib": report["peak_rss_mib"],
            "matmul_gflops": report["matmul_gflops"],
            "cpu": report["cpu"]}


def block_weights(model: str) -> int:
    """Weights of the blocks' linear layers (2-D arrays under ``model.layers.``), from the
    config alone: nothing is loaded."""
    total = 0
    for name, shape in expected_shapes(open_checkpoint(model).config).items():
        if name.startswith("model.layers.") and len(shape) == 2:
            total += shape[0] * shape[1]  # [N, K]
    return total


def summarize(model: str, method: str, runs: list[dict], blocks: int) -> dict:
    """One row of the table: the rounds of one method on one model."""
    rates = [run["step_tok_s"] for run in runs]
    return {"model": model, "method": method, "options": METHODS[method],
            "trainable_parameters": runs[0]["trainable_parameters"],
            "block_weights": blocks,
            "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
            "step_tok_s_best": max(rates), "step_tok_s_median": statistics.median(rates),
            "first_step_tok_s_median": statistics.median(r["first_step_tok_s"] for r in runs),
            "peak_rss_mib_max": max(run["peak_rss_mib"] for run in runs),
            "rounds": runs}


def add_ratios(rows: list[dict]) -> None:
    """Each row's step tok/s over full fine-tuning's on the same model (best over best, median
    over median), when full fine-tuning ran."""
    full = {row["model"]: row for row in rows if row["method"] == "full"}
    for row in rows:
        base = full.get(row["model"])
        row["x_full_best"] = base and row["step_tok_s_best"] / base["step_tok_s_best"]
        row["x_full_median"] = base and row["step_tok_s_median"] / base["step_tok_s_median"]


def table(rows: list[dict]) -> str:
    """The markdown table, one line per model and method."""
    lines = ["| model | method | trainable parameters | % of block weights | optimizer state MiB "
             "| step tok/s (best, median of rounds) | x full (best, median) | step 1 tok/s "
             "(median) | peak RSS MiB (max of rounds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "-"
        if row["x_full_best"] is not None:
            ratio = f"{row['x_full_best']:.2f}, {row['x_full_median']:.2f}"
        lines.append(f"| {Path(row['model']).name} | {label(row['method'])} | "
                     f"{row['trainable_parameters']:,} | "
                     f"{100 * row['trainable_parameters'] / row['block_weights']:.2f}% | "
                     f"{row['optimizer_state_bytes'] / 2**20:.1f} | "
                     f"{row['step_tok_s_best']:.1f}, {row['step_tok_s_median']:.1f} | {ratio} | "
                     f"{row['first_step_tok_s_median']:.1f} | {row['peak_rss_mib_max']:.0f} |")
    return "\n".join(lines)


def label(method: str) -> str:
    """``full``, or the method with its settings, e.g. ``lora --rank 8``."""
    return " ".join(METHODS[method]).replace("--method ", "") or method


def git_commit() -> str | None:
    """The checked-out commit of this repository, if git can tell."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="the dense model")
    parser.add_argument("--source", default=None,
                        help="a pruned folder to run the methods on as well (PST skipped)")
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "sara", "pst"],
                        choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per run (at least 4 for PST: its schedule)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="windows per step")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--save", action="store_true", help="append the rows to --jsonl")
    parser.add_argument("--jsonl", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not counted")
    command = "python " + shlex.join(sys.argv if argv is None else [__file__, *argv])
    methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    plan = [(args.model, method) for method in methods]
    if args.source:
        plan += [(args.source, method) for method in methods if method not in DENSE_ONLY]

    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in plan}
    with tempfile.TemporaryDirectory(prefix="finetune_speed_") as tmp:
        for round_ in range(1, args.rounds + 1):
            for i, (model, method) in enumerate(plan):
                print(f"== round {round_}: {method} on {model}", file=sys.stderr, flush=True)
                out = Path(tmp) / f"round{round_}-{i}-{method}"
                runs[model, method].append(run_once(model, method, args, out))
    blocks = {model: block_weights(model) for model, _ in plan}
    rows = [summarize(model, method, runs[model, method], blocks[model]) for model, method in plan]
    add_ratios(rows)

    first = rows[0]["rounds"][0]
    gflops = [run["matmul_gflops"] for row in rows for run in row["rounds"]]
    print(f"Fine-tuning cost, --loss ce, {args.steps} steps of {args.batch} x {args.seqlen} "
          f"tokens per run, {args.rounds} rounds interleaved; step tok/s = median over a run's "
          f"steps 2-{args.steps}\n")
    print(table(rows))
    print(f"\nCPU: {first['cpu']}; NumPy float32 matmul {min(gflops):.0f}-{max(gflops):.0f} "
          f"GFLOP/s over the runs (each run's own probe); OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    each = shlex.join(finetune_command("MODEL", "full", args, Path("OUT"))[1:])
    print(f"Each run: python {each}, with the method's options before --out")
    print(f"Command: {command}")
    if args.save:
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        extra = {"steps": args.steps, "batch": args.batch, "seqlen": args.seqlen,
                 "loss": "ce", "cpu": first["cpu"], "date": date, "commit": git_commit(),
                 "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                 "command": command}
        with open(args.jsonl, "a") as handle:
            for row in rows:
                handle.write(json.dumps({**row, **extra}) + "\n")
        print(f"rows appended to {args.jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
