"""Perplexity of SmolLM2 pruned by every method at every sparsity, as one markdown table.

    python bench/prune_table.py [--out-root DIR] [--windows 40] [--only NAME ...]

Each configuration is pruned with ``npsparse prune`` defaults (32 calibration windows x 512
tokens of the pydoc calibration part, seed 0) and evaluated on the first 40 windows x 512 tokens
of the eval part. Each configuration runs in its own process, so its peak RSS is its own. Results
are appended to ``DIR/results.jsonl`` as they finish (a configuration already there is not run
again), and the table is printed from that file. The last configuration prunes Wanda 50% a second
time and checks that the weights hash is identical (determinism).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import npsparse
from npsparse.sequential import PruneSettings, prune_model

PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
RUN_ORDER = ["0.5", "0.7", "2:4", "0.6", "4:8"]  # most telling first
METHODS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("dsnot", "wanda"),
           ("dsnot", "sparsegpt")]


def configurations():
    out = [("dense", None, None, None, False)]
    for pattern in RUN_ORDER:
        for method, base in METHODS:
            name = f"{method}{'-' + base if base else ''}-{pattern.replace(':', 'of')}"
            out.append((name, method, base, pattern, False))
    for method, base in (("wanda", None), ("sparsegpt", None)):
        out.append((f"owl-{method}-0.7", method, base, "0.7", True))
    out.append(("wanda-0.5-rerun", "wanda", None, "0.5", False))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out-root", type=Path, default=Path("runs"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--only", nargs="*", help="run only these configuration names")
    parser.add_argument("--keep", action="store_true", help="keep pruned model folders")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out_root.mkdir(parents=True, exist_ok=True)
    results_path = args.out_root / "results.jsonl"
    done = read_results(results_path)
    if args.worker:
        return run_one(args)
    for name, *_ in configurations():
        if name in done or (args.only and name not in args.only):
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--model", args.model, "--out-root",
                   str(args.out_root), "--windows", str(args.windows), "--worker", name]
        if args.keep:
            command.append("--keep")
        subprocess.run(command, check=True)
        done = read_results(results_path)
        print(f"   ppl {done[name]['ppl']:.3f}", file=sys.stderr, flush=True)
    print_table(done)
    return 0


def read_results(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["name"]] = row
    return rows


def run_one(args) -> int:
    """Prune and evaluate one configuration (in a fresh process) and append its row."""
    name, method, base, pattern, owl = next(c for c in configurations() if c[0] == args.worker)
    row = {"name": name, "method": method, "base": base, "pattern": pattern, "owl": owl}
    target = args.model
    if method is not None:
        folder = args.out_root / name
        settings = PruneSettings(method=method, pattern=pattern, base=base, owl=owl,
                                 error_report=True)  # the table's error column, magnitude too
        report = prune_model(args.model, folder, settings, progress=False)
        row.update(prune_seconds=report["seconds"], peak_rss_mib=report["peak_rss_mib"],
                   sparsity=report["mean_layer_sparsity"],
                   weights_sha256=report["weights_sha256"],
                   recon_rel=sum(v["recon_rel"] for v in report["layers"].values())
                   / len(report["layers"]))
        target = folder
    start = time.perf_counter()
    result = npsparse.load(target).perplexity("pydoc", 512, args.windows)
    row.update(ppl=result.ppl, nll=result.nll, windows=result.windows,
               eval_seconds=time.perf_counter() - start)
    with open(args.out_root / "results.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    if method is not None and not args.keep:
        shutil.rmtree(args.out_root / name)
    return 0


def print_table(rows: dict) -> None:
    dense = rows.get("dense", {}).get("ppl")
    print(f"SmolLM2-135M-Instruct, perplexity on the first 40 x 512 eval tokens; dense "
          f"{dense:.3f}" if dense else "dense: not measured")
    print()
    print("| method | " + " | ".join(PATTERNS) + " |")
    print("|---|" + "---|" * len(PATTERNS))
    for method, base in METHODS:
        cells = []
        for pattern in PATTERNS:
            name = f"{method}{'-' + base if base else ''}-{pattern.replace(':', 'of')}"
            cells.append(f"{rows[name]['ppl']:.2f}" if name in rows else "—")
        label = f"DSnoT (base {base})" if method == "dsnot" else method
        print(f"| {label} | " + " | ".join(cells) + " |")
    for method in ("wanda", "sparsegpt"):
        name = f"owl-{method}-0.7"
        if name in rows:
            print(f"\nOWL + {method} at 0.7: {rows[name]['ppl']:.2f}")
    if "wanda-0.5" in rows and "wanda-0.5-rerun" in rows:
        same = rows["wanda-0.5"]["weights_sha256"] == rows["wanda-0.5-rerun"]["weights_sha256"]
        print(f"\ndeterminism: Wanda 50% pruned twice, weights sha256 "
              f"{rows['wanda-0.5']['weights_sha256'][:16]}... "
              f"{'identical' if same else 'DIFFERENT: ' + rows['wanda-0.5-rerun']['weights_sha256'][:16]}"
              f", ppl {rows['wanda-0.5']['ppl']!r} vs {rows['wanda-0.5-rerun']['ppl']!r}")
    timed = [r for r in rows.values() if "prune_seconds" in r]
    if timed:
        print("\n| configuration | prune s | peak RSS MiB | mean layer sparsity | mean rel. recon. error |")
        print("|---|---|---|---|---|")
        for r in timed:
            print(f"| {r['name']} | {r['prune_seconds']:.0f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['sparsity']:.4f} | {r['recon_rel']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
