"""Decode speed of whole models against this machine's memory-bandwidth roofline.

    npsparse bench decode [MODEL ...] [--format dense bf16 ...] [--tokens 64] [--repeats 3]

Each MODEL (a GGUF file, a folder, ``smollm2``; default ``smollm2``) runs in each ``--format``;
``MODEL@FORMAT`` pins one format to one model instead (``smollm2@dense runs/w50@bitmask``). A
packed folder (``npsparse pack``) runs as stored with format ``dense`` and is labelled by the
formats it holds.

Per run: greedy decode of ``--tokens`` tokens after a short prompt (best of ``--repeats``), then
``roofline % = tokens/s x bytes read per token / measured read bandwidth``, the bandwidth measured
in the same process before and after (best of both). Bytes per token count every weight byte of the
block linears and the output head, one embedding row, and the KV cache read at the mean position.
All runs take turns within each repeat (one loaded model per run), so a noisy neighbour slows them
alike and the speedup columns (over the first run whose block layers are all float32, and the first
all bf16) stay meaningful. Peak RSS
of the process is printed at the end.
"""

from __future__ import annotations

import argparse
import resource
import sys

import npsparse
from npsparse.generate import generate
from npsparse.roofline import measure_read_bandwidth


PROG = "npsparse bench decode"


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


def parse_runs(models: list[str], formats: list[str]) -> list[tuple[str, str]]:
    """``(model, format)`` pairs from ``MODEL`` and ``MODEL@FORMAT`` arguments."""
    runs = []
    for model in models:
        if "@" in model:
            path, fmt = model.rsplit("@", 1)
            runs.append((path, fmt))
        else:
            runs += [(model, fmt) for fmt in formats]
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["smollm2"],
                        help="models, optionally MODEL@FORMAT")
    parser.add_argument("--format", nargs="+", default=["dense"],
                        help="formats for models given without @FORMAT (dense = as loaded)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    from npsparse.packing import apply_format, layer_formats

    runs = []
    for model, fmt in parse_runs(args.models, args.format):
        llm = npsparse.load(model)
        if fmt != "dense":
            info = apply_format(llm.model, fmt)
            print(f"{model}: packed {fmt} in {info['seconds']:.1f} s: {info['formats']}, head "
                  f"{info['head']}", file=sys.stderr)
        # What runs, not what was asked: a packed folder "@dense" runs in its stored formats,
        # so it is labelled by them and never becomes the dense fp32 baseline.
        formats = layer_formats(llm.model)
        runs.append((f"{model}@{formats if fmt == 'dense' else fmt}", formats, llm))
    prompt = runs[0][2].encode("The Python standard library documentation describes")
    for _, _, llm in runs:  # warm-up: compile kernels, fault in pages
        decode_run(llm, prompt, 4, 1)
    before = measure_read_bandwidth()
    best = {label: (0.0, 0.0) for label, _, _ in runs}
    for _ in range(args.repeats):
        for label, _, llm in runs:
            tok_s, prefill = decode_run(llm, prompt, args.tokens, 1)
            best[label] = (max(best[label][0], tok_s), max(best[label][1], prefill))
    after = measure_read_bandwidth()
    bandwidth = max(before.best, after.best)
    baseline = {}  # the first run whose block layers are all float32, and all bf16
    for label, formats, _ in runs:
        baseline.setdefault(formats, best[label][0])

    print(f"{args.tokens} tokens after a {len(prompt)}-token prompt, best of {args.repeats} "
          "interleaved runs")
    print(f"bandwidth: {before} (before); {after} (after); roofline uses {bandwidth / 1e9:.1f} GB/s")
    print()
    print("| model@format | MB read/token | decode tok/s | roofline tok/s | % of roofline "
          "| x dense fp32 | x bf16 | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    mean_pos = len(prompt) + args.tokens / 2
    for label, _, llm in runs:
        tok_s, prefill = best[label]
        per_token = llm.model.weight_bytes() + kv_bytes_per_token(llm.config, mean_pos)
        roof = bandwidth / per_token
        vs = [f"{tok_s / baseline[b]:.2f}" if b in baseline else "" for b in ("dense", "bf16")]
        print(f"| {label} | {per_token / 1e6:.1f} | {tok_s:.1f} | {roof:.1f} | "
              f"{100 * tok_s / roof:.0f}% | {vs[0]} | {vs[1]} | {prefill:.0f} |")
    print(f"\ncommand: npsparse bench decode {' '.join(argv)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
