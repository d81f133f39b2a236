"""Decode speed of a model against this machine's memory-bandwidth roofline.

    python bench/bench_decode.py [MODEL] [--tokens 64] [--repeats 3] [--format dense ...]

For each weight format: greedy decode of ``--tokens`` tokens after a short prompt (best of
``--repeats``), then ``roofline % = tokens/s x bytes read per token / measured read bandwidth``,
with the bandwidth measured in the same run (before and after; best of both). Bytes per token count
every weight byte of the block linears and the output head, one embedding row, and the KV cache
read at the mean position. The formats take turns within each repeat (one model copy per format),
so that a noisy neighbour slows them all alike and the speedup columns stay meaningful. Peak RSS of
the process is printed at the end.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

import npsparse
from npsparse.generate import generate
from npsparse.roofline import measure_read_bandwidth


def kv_bytes_per_token(config, mean_position: float) -> float:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4 * mean_position


def decode_run(llm, prompt_ids, tokens: int, repeats: int) -> tuple[float, float]:
    """Best decode tokens/s and best prefill tokens/s over ``repeats`` greedy runs."""
    decode, prefill = 0.0, 0.0
    for _ in range(repeats):
        result = generate(llm.model, prompt_ids, tokens)  # greedy, no EOS stop
        decode = max(decode, result.decode_tok_s)
        prefill = max(prefill, result.prefill_tok_s)
    return decode, prefill


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", nargs="+", default=["dense"],
                        help="weight formats to compare (dense = float32 BLAS)")
    args = parser.parse_args(argv)

    llms = {}
    for fmt in args.format:
        llm = npsparse.load(args.model)
        if fmt != "dense":
            from npsparse.sparse import apply_format

            info = apply_format(llm.model, fmt)
            print(f"packed {fmt} in {info['seconds']:.1f} s: {info['formats']}, head "
                  f"{info['head']}", file=sys.stderr)
        llms[fmt] = llm
    prompt = llm.encode("The Python standard library documentation describes")
    for llm in llms.values():  # warm-up: compile kernels, fault in pages
        decode_run(llm, prompt, 4, 1)
    before = measure_read_bandwidth()
    best = {fmt: (0.0, 0.0) for fmt in llms}
    for _ in range(args.repeats):
        for fmt, llm in llms.items():
            tok_s, prefill = decode_run(llm, prompt, args.tokens, 1)
            best[fmt] = (max(best[fmt][0], tok_s), max(best[fmt][1], prefill))
    rows = []
    mean_pos = len(prompt) + args.tokens / 2
    for fmt, llm in llms.items():
        per_token = llm.model.weight_bytes() + kv_bytes_per_token(llm.config, mean_pos)
        rows.append((fmt, *best[fmt], per_token))
    after = measure_read_bandwidth()
    bandwidth = max(before.best, after.best)

    print(f"model: {llm!r}; {args.tokens} tokens after a {len(prompt)}-token prompt, best of "
          f"{args.repeats} interleaved runs")
    print(f"bandwidth: {before} (before); {after} (after); roofline uses {bandwidth / 1e9:.1f} GB/s")
    print()
    print("| format | MB read/token | decode tok/s | roofline tok/s | % of roofline "
          "| x dense fp32 | x bf16 | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, tok_s, prefill, per_token in rows:
        roof = bandwidth / per_token
        vs = [f"{tok_s / best[base][0]:.2f}" if base in best else "" for base in ("dense", "bf16")]
        print(f"| {fmt} | {per_token / 1e6:.1f} | {tok_s:.1f} | {roof:.1f} | "
              f"{100 * tok_s / roof:.0f}% | {vs[0]} | {vs[1]} | {prefill:.0f} |")
    print(f"\ncommand: python bench/bench_decode.py {' '.join(sys.argv[1:])}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
