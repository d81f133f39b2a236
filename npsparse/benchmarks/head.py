"""The output head as the GGUF stores it (Q8_0) against the bf16 head, kernel and whole decode.

    npsparse bench head [--calls 60] [--models DIR ...] [--format auto] [--tokens 64] [--repeats 3]

Part 1, the GEMV at SmolLM2's head shape [49152, 576] (its own Q8_0 blocks when the default model
is installed, else random ones): the Q8_0 kernel (both lowerings) and the bf16 GEMV of the same
values, interleaved call by call with a parallel read of as many bytes as the bf16 head (the
probe), weights cold (enough copies to exceed 96 MiB). Per kernel: best and median microseconds,
GB/s, % of the best bandwidth measured in the same run, and the ratio to bf16.

Part 2, with ``--models``: each model (a pruned folder, say) packed as ``--format`` twice, once
with the bf16 head and once with ``--head auto`` (the Q8_0 head where the checkpoint holds Q8_0),
then greedy decode of ``--tokens`` tokens after a short prompt, the runs taking turns, best of
``--repeats``; tokens/s and the ratio, and whether both heads chose the same tokens.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import npsparse.kernels as nk
from npsparse.benchmarks import cpu_line
from npsparse.benchmarks.kernels import (PROBE, copies_for, per_call_bandwidth,
                                         time_round_robin)
from npsparse.roofline import parallel_sum

PROG = "npsparse bench head"
SHAPE = (49152, 576)
COLD_BYTES = 96 * 2**20


def head_arrays():
    """SmolLM2's Q8_0 head blocks, or random ones of the same shape if it is not installed."""
    try:
        from npsparse.io import open_checkpoint

        blocks = open_checkpoint("smollm2").q8_0_blocks("model.embed_tokens.weight")
        if blocks is not None:
            return blocks, "SmolLM2's own Q8_0 blocks"
    except Exception:  # the default model is optional here
        pass
    rng = np.random.default_rng(0)
    values = rng.integers(-127, 128, size=SHAPE, dtype=np.int8)
    scales = (rng.random((SHAPE[0], SHAPE[1] // 32)) * 1e-3).astype(np.float16)
    return (values, scales), "random Q8_0 blocks"


def gemv_part(calls: int) -> None:
    (values, scales), source = head_arrays()
    q8_layer = nk.Q8Linear.from_q8_0(values, scales)
    bf16_layer = nk.pack(q8_layer.to_dense(), None, "bf16")
    x = np.random.default_rng(1).standard_normal((1, SHAPE[1])).astype(np.float32)
    candidates, nbytes = {}, {}
    for label, layer in (("bf16", bf16_layer), ("q8_0 vector", q8_layer),
                         ("q8_0 portable", q8_layer)):
        path = label.split()[-1]
        copies = [nk.from_arrays({k: a.copy() for k, a in nk.to_arrays(layer)[0].items()},
                                 nk.to_arrays(layer)[1])
                  for _ in range(copies_for(layer.nbytes, COLD_BYTES))]
        for copy in copies:
            if isinstance(copy, nk.Q8Linear):
                copy.path = path
        candidates[label] = [lambda c=c: c(x) for c in copies]
        nbytes[label] = layer.nbytes
    probe = np.ones((64, bf16_layer.nbytes // 256), dtype=np.float32)
    candidates[PROBE] = [lambda: parallel_sum(probe)]
    nbytes[PROBE] = probe.nbytes
    before = per_call_bandwidth()
    times = time_round_robin(candidates, passes=5, min_calls=calls)
    after = per_call_bandwidth()
    bandwidth = max(before[0], after[0], nbytes[PROBE] / times[PROBE][0])
    print(cpu_line())
    print(f"head [{SHAPE[0]}, {SHAPE[1]}] from {source}; x [1, {SHAPE[1]}] float32; "
          f"weights cold; best of >= {calls} interleaved calls per kernel")
    print(f"B = {bandwidth / 1e9:.1f} GB/s (best of: 32 MiB probes before "
          f"{before[0] / 1e9:.1f}, after {after[0] / 1e9:.1f}, interleaved "
          f"{nbytes[PROBE] / times[PROBE][0] / 1e9:.1f})")
    print("| kernel | MB read | best us | median us | GB/s | % of B | x bf16 (best) "
          "| x bf16 (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for label in ("bf16", "q8_0 vector", "q8_0 portable"):
        best, median = times[label]
        rate = nbytes[label] / best
        print(f"| {label} | {nbytes[label] / 1e6:.1f} | {best * 1e6:.0f} | {median * 1e6:.0f} | "
              f"{rate / 1e9:.1f} | {100 * rate / bandwidth:.0f}% | "
              f"{times['bf16'][0] / best:.2f} | {times['bf16'][1] / median:.2f} |")


def decode_part(models, fmt: str, tokens: int, repeats: int) -> None:
    import npsparse
    from npsparse.benchmarks.decode import decode_run
    from npsparse.generate import generate
    from npsparse.packing import apply_format

    runs = []
    for model in models:
        for head in ("bf16", "auto"):
            llm = npsparse.load(model)
            info = apply_format(llm.model, fmt, head=head, checkpoint=llm.checkpoint)
            runs.append((f"{model}@{fmt}, head {info['head']}", llm))
    prompt = runs[0][1].encode("The Python standard library documentation describes")
    for _, llm in runs:  # compile, fault in pages
        decode_run(llm, prompt, 4, 1)
    best = {label: 0.0 for label, _ in runs}
    chosen = {}
    for _ in range(repeats):
        for label, llm in runs:
            best[label] = max(best[label], decode_run(llm, prompt, tokens, 1)[0])
            if label not in chosen:
                chosen[label] = list(generate(llm.model, prompt, 16).ids)
    print(f"\ndecode: {tokens} tokens after a {len(prompt)}-token prompt, greedy, best of "
          f"{repeats} interleaved runs")
    print("| model | MB read/token | decode tok/s | x bf16 head | first 16 tokens as bf16 head |")
    print("|---|---|---|---|---|")
    for i, (label, llm) in enumerate(runs):
        base = runs[i - i % 2][0]
        same = "yes" if chosen[label] == chosen[base] else "no"
        print(f"| {label} | {llm.model.weight_bytes() / 1e6:.1f} | {best[label]:.1f} | "
              f"{best[label] / best[base]:.2f} | {same} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="timed calls per kernel, at least")
    parser.add_argument("--models", nargs="*", default=[], help="models to decode with each head")
    parser.add_argument("--format", default="auto", help="block layer format for --models")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gemv_part(args.calls)
    if args.models:
        decode_part(args.models, args.format, args.tokens, args.repeats)
    print(f"\ncommand: {PROG} {' '.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
