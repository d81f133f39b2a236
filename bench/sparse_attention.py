"""SPT's top-L sparse attention on SmolLM2 (issue 16): attention time against exact attention in
the same run, its output error, and the perplexity change, at 512 and 2048 positions.

    python bench/sparse_attention.py [--lengths 512 2048] [--keep-fraction 8 16] [--repeats 5]
                                     [--out FILE.json]

For each length T the eval windows are the first 20,480 tokens of the pydoc eval text (40 x 512
or 10 x 2048), so every length scores the same tokens. Per length:

- codebooks (M = 8 subspaces, C = 16 centroids per key/value head and layer) are fitted on 4
  calibration windows of T tokens (``calibrate_topk_attention``, seed 0);
- perplexity with exact attention and with top-L attention for each L = T / f (f from
  ``--keep-fraction``; SPT keeps S / 8);
- attention alone, timed on the real post-RoPE queries, keys and values of block 15 on the first
  window: exact causal attention (``causal_attention``) against ``topk_attention`` (encoding the
  keys included), best of ``--repeats`` interleaved calls after a warm-up, and the relative
  error ``||exact - sparse|| / ||exact||`` of that block's attention output.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

TOKENS = 20480  # 40 x 512 = 10 x 2048
BLOCK = 15  # a middle block of SmolLM2's 30


def cpu_name() -> str:
    from npsparse.roofline import cpu_name as name
    return name()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    import npsparse
    from npsparse.evaluate import perplexity
    from npsparse.models.layers import causal_attention
    from npsparse.sparse_attention import (attention_error, calibrate_topk_attention,
                                           topk_attention, use_topk_attention)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--keep-fraction", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="eval tokens per length (whole windows of each length)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    llm = npsparse.load("smollm2")
    net = llm.model
    rows = []
    for length in args.lengths:
        windows = llm.eval_windows("pydoc", seqlen=length, windows=args.tokens // length)
        use_topk_attention(llm, None)
        exact_ppl = perplexity(net, windows, progress=False).ppl
        # block BLOCK's real queries, keys and values on the first window
        x = net.embed(windows[0], 0)
        for i, block in enumerate(net.blocks[:BLOCK + 1]):
            tape = {} if i == BLOCK else None
            x = block(x, 0, tape=tape)
        q, k, v = (np.ascontiguousarray(tape[name]) for name in ("q", "k", "v"))
        exact_out = causal_attention(q, k, v, 0)
        for fraction in args.keep_fraction:
            keep = max(1, length // fraction)
            fit = calibrate_topk_attention(llm, keep, seqlen=length)
            books = net.blocks[BLOCK].attention.codebooks
            sparse_ppl = perplexity(net, windows, progress=False).ppl
            sparse_out = topk_attention(q, k, v, 0, keep, books)  # warm-up (compiles)
            exact_s = sparse_s = float("inf")
            for _ in range(args.repeats):  # interleaved
                exact_s = min(exact_s, best_time(lambda: causal_attention(q, k, v, 0), 1))
                sparse_s = min(sparse_s, best_time(
                    lambda: topk_attention(q, k, v, 0, keep, books), 1))
            row = {"length": length, "windows": int(len(windows)), "keep": keep,
                   "ppl_exact": exact_ppl, "ppl_topk": sparse_ppl,
                   "ppl_change": sparse_ppl / exact_ppl - 1,
                   "attention_error": attention_error(exact_out, sparse_out),
                   "exact_ms": exact_s * 1e3, "topk_ms": sparse_s * 1e3,
                   "x_exact": exact_s / sparse_s, "fit_seconds": fit["fit_seconds"],
                   "calibration": fit["calibration"], "block": BLOCK}
            rows.append(row)
            print(f"T={length} L={keep}: ppl {exact_ppl:.4f} -> {sparse_ppl:.4f} "
                  f"({100 * row['ppl_change']:+.2f}%), block {BLOCK} attention error "
                  f"{row['attention_error']:.4f}, exact {row['exact_ms']:.1f} ms, top-L "
                  f"{row['topk_ms']:.1f} ms ({row['x_exact']:.2f}x exact)", flush=True)
    use_topk_attention(llm, None)
    print(f"\ncpu: {cpu_name()} ({platform.machine()})")
    print("| T | L | ppl exact | ppl top-L | change | attention error (block 15) | exact ms | "
          "top-L ms | x exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['keep']} | {r['ppl_exact']:.4f} | {r['ppl_topk']:.4f} | "
              f"{100 * r['ppl_change']:+.2f}% | {r['attention_error']:.4f} | "
              f"{r['exact_ms']:.1f} | {r['topk_ms']:.1f} | {r['x_exact']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
