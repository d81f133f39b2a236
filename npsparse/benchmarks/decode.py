"""Decode speed of whole models against this machine's memory-bandwidth roofline.

    npsparse bench decode [MODEL ...] [--format dense bf16 ...] [--tokens 64] [--repeats 3]
                          [--threads auto N ...] [--busy]

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

``--threads`` runs every model with each thread setting: ``auto`` (the default: as many threads as
the other processes leave CPUs free, :mod:`npsparse.threads`) or a fixed count. ``--busy`` adds,
within each repeat, a second pass over the runs while one CPU-bound process (a Python busy loop)
runs beside them, and prints each run's tokens/s under that load and its share of the quiet
tokens/s: how decode degrades on a laptop whose other programs keep a core busy.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys

import numba

import npsparse
from npsparse.generate import generate
from npsparse.kernels import set_threads
from npsparse.roofline import measure_read_bandwidth
from npsparse.threads import allowed_cpus


PROG = "npsparse bench decode"


def kv_bytes_per_token(config, mean_position: float) -> float:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4 * mean_position


def decode_run(llm, prompt_ids, tokens: int, repeats: int,
               threads: str = "auto") -> tuple[float, float]:
    """Best decode tokens/s and best prefill tokens/s over ``repeats`` greedy runs.

    ``threads`` is ``"auto"`` (load-aware) or a fixed count, restored afterwards.
    """
    decode, prefill = 0.0, 0.0
    initial = numba.get_num_threads()
    if threads != "auto":
        set_threads(int(threads))
    try:
        for _ in range(repeats):
            result = generate(llm.model, prompt_ids, tokens,  # greedy, no EOS stop
                              adapt_threads=threads == "auto")
            decode = max(decode, result.decode_tok_s)
            prefill = max(prefill, result.prefill_tok_s)
    finally:
        set_threads(initial)
    return decode, prefill


@contextlib.contextmanager
def busy_process():
    """One CPU-bound process (a Python busy loop) beside the block, killed at its end."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def check_threads(values: list[str]) -> list[str]:
    ceiling = numba.config.NUMBA_NUM_THREADS
    for value in values:
        if value != "auto" and not (value.isdigit() and 1 <= int(value) <= ceiling):
            raise SystemExit(f"{PROG}: error: --threads takes auto or 1..{ceiling}, got {value!r}")
    return values


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
    parser.add_argument("--threads", nargs="+", default=["auto"],
                        help="thread settings to run each model with: auto and/or fixed counts")
    parser.add_argument("--busy", action="store_true",
                        help="also time every run beside one CPU-bound process")
    args = parser.parse_args(argv)
    check_threads(args.threads)
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
        label = f"{model}@{formats if fmt == 'dense' else fmt}"
        for threads in args.threads:
            suffix = "" if args.threads == ["auto"] else f" threads={threads}"
            runs.append((label + suffix, formats, llm, threads))
    prompt = runs[0][2].encode("The Python standard library documentation describes")
    for _, _, llm, threads in runs:  # warm-up: compile kernels, fault in pages
        decode_run(llm, prompt, 4, 1, threads)
    before = measure_read_bandwidth()
    best = {label: (0.0, 0.0) for label, _, _, _ in runs}
    busy = {label: 0.0 for label, _, _, _ in runs}
    for _ in range(args.repeats):
        for label, _, llm, threads in runs:
            tok_s, prefill = decode_run(llm, prompt, args.tokens, 1, threads)
            best[label] = (max(best[label][0], tok_s), max(best[label][1], prefill))
        if args.busy:
            with busy_process():
                for label, _, llm, threads in runs:
                    tok_s, _ = decode_run(llm, prompt, args.tokens, 1, threads)
                    busy[label] = max(busy[label], tok_s)
    after = measure_read_bandwidth()
    bandwidth = max(before.best, after.best)
    baseline = {}  # the first run whose block layers are all float32, and all bf16
    for label, formats, _, _ in runs:
        baseline.setdefault(formats, best[label][0])

    print(f"{args.tokens} tokens after a {len(prompt)}-token prompt, best of {args.repeats} "
          "interleaved runs")
    print(f"bandwidth: {before} (before); {after} (after); roofline uses {bandwidth / 1e9:.1f} GB/s")
    print()
    busy_head = " busy tok/s | busy / quiet |" if args.busy else ""
    print("| model@format | MB read/token | decode tok/s | roofline tok/s | % of roofline "
          "| x dense fp32 | x bf16 | prefill tok/s |" + busy_head)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.busy else ""))
    mean_pos = len(prompt) + args.tokens / 2
    for label, _, llm, _ in runs:
        tok_s, prefill = best[label]
        per_token = llm.model.weight_bytes() + kv_bytes_per_token(llm.config, mean_pos)
        roof = bandwidth / per_token
        vs = [f"{tok_s / baseline[b]:.2f}" if b in baseline else "" for b in ("dense", "bf16")]
        loaded = (f" {busy[label]:.1f} | {busy[label] / tok_s:.2f} |" if args.busy else "")
        print(f"| {label} | {per_token / 1e6:.1f} | {tok_s:.1f} | {roof:.1f} | "
              f"{100 * tok_s / roof:.0f}% | {vs[0]} | {vs[1]} | {prefill:.0f} |" + loaded)
    if args.busy:
        print(f"\nbusy: one `{sys.executable} -c 'while True: pass'` beside each busy pass, "
              f"{len(allowed_cpus())} CPUs allowed, Numba ceiling {numba.config.NUMBA_NUM_THREADS} "
              "threads")
    print(f"\ncommand: npsparse bench decode {' '.join(argv)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
