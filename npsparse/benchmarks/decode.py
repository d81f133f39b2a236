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

``ms/token outside products``: after the timed rounds, one more greedy run per npsparse run
counts the time spent inside the matrix products (on the compiled path, the CPU's cycle counter
around each product inside it; elsewhere the wall time of each product call) and prints the rest
of the decode time per token: norms, attention, SwiGLU, dispatch and Python. ``--steps token
block`` runs every model both with one compiled call per block (``token``, the default,
:mod:`npsparse.models.llama_token`) and with the per-block steps (``block``).

``--activations fp32 int8`` runs every model also in the lossy fast mode (``--activations int8``:
the block layers packed as qpanel, :mod:`npsparse.kernels.qpanel`); ``MODEL@qpanel`` does the same
for one model. A qpanel run is paired with an exact run of the same model: on the same
perplexity windows (40 by default then) it prints the perplexity change and the top-1 agreement,
the share of predicted positions whose most likely token is the exact run's.

``--threads`` runs every model with each thread setting: ``auto`` (the default: as many threads as
the other processes leave CPUs free, :mod:`npsparse.threads`) or a fixed count. ``--busy`` adds,
within each repeat, a second pass over the runs while one CPU-bound process (a Python busy loop)
runs beside them, and prints each run's tokens/s under that load and its share of the quiet
tokens/s: how decode degrades on a laptop whose other programs keep a core busy.

``--llama-cpp [VARIANT ...]`` adds llama.cpp's decode of the same GGUF (``--llama-cpp-gguf``,
default the embedded SmolLM2) to the same rounds: the file as shipped and Q8_0 and F16
re-quantized from it (:mod:`npsparse.benchmarks.llama_cpp`; needs ``npsparse[compare]``). With
``auto`` threads llama.cpp runs as many threads as CPUs are allowed (it has no load-aware mode).
``--ppl-windows N`` (default 40 with ``--llama-cpp``, else 0) adds each run's perplexity on the
first N pydoc eval windows, computed by npsparse: for a llama.cpp variant, of its GGUF's weights
as npsparse dequantizes them (llama.cpp's own arithmetic also rounds activations to 8 bits).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np

import npsparse
from npsparse.benchmarks import cpu_line
from npsparse.errors import NpsparseError
from npsparse.evaluate import perplexity
from npsparse.generate import generate
from npsparse.kernels import set_threads
from npsparse.kernels.step import tick_seconds
from npsparse.roofline import measure_read_bandwidth
from npsparse.threads import allowed_cpus


PROG = "npsparse bench decode"


def kv_bytes_per_token(config, mean_position: float) -> float:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4 * mean_position


@contextlib.contextmanager
def thread_setting(threads: str):
    """Within the block, the kernels run ``threads`` threads: ``"auto"`` leaves the count to the
    load-aware decode, a number fixes it; the count before is restored after."""
    initial = numba.get_num_threads()
    if threads != "auto":
        set_threads(int(threads))
    try:
        yield
    finally:
        set_threads(initial)


def decode_run(llm, prompt_ids, tokens: int, repeats: int,
               threads: str = "auto") -> tuple[float, float]:
    """Best decode tokens/s and best prefill tokens/s over ``repeats`` greedy runs.

    ``threads`` is ``"auto"`` (load-aware) or a fixed count, restored afterwards.
    """
    decode, prefill = 0.0, 0.0
    with thread_setting(threads):
        for _ in range(repeats):
            result = generate(llm.model, prompt_ids, tokens,  # greedy, no EOS stop
                              adapt_threads=threads == "auto")
            decode = max(decode, result.decode_tok_s)
            prefill = max(prefill, result.prefill_tok_s)
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


@contextlib.contextmanager
def timed_products(spent: list[float]):
    """Within the block, every product called from Python adds its wall time to ``spent[0]``."""
    from npsparse.kernels import FORMATS

    classes = set(FORMATS.values())
    originals = {cls: cls.__call__ for cls in classes}

    def timed(call):
        def wrapper(self, x):
            start = time.perf_counter()
            try:
                return call(self, x)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    for cls, call in originals.items():
        cls.__call__ = timed(call)
    try:
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


class NpsparseRun:
    """One npsparse model in one format, thread setting and decode step (token: one compiled
    call per block, :mod:`npsparse.models.llama_token`; block: the per-block steps)."""

    def __init__(self, label: str, formats: str, llm, threads: str, step: str = "token"):
        self.label, self.formats, self.llm, self.threads = label, formats, llm, threads
        self.step = step
        self.config = llm.config

    def decode(self, prompt, tokens: int) -> tuple[float, float]:
        self.llm.model.token_step = self.step == "token"
        return decode_run(self.llm, prompt, tokens, 1, self.threads)

    def outside_products(self, prompt, tokens: int, tick_s: float) -> float:
        """Milliseconds per decoded token spent outside the matrix products, from one more run.

        On the compiled path the products' cycles are counted inside it
        (:data:`npsparse.models.llama_token.PRODUCT_TICKS`); products called from Python are
        timed around each call (their dispatch then counts as product time).
        """
        from npsparse.models.llama_token import PRODUCT_TICKS

        self.llm.model.token_step = self.step == "token"
        spent, seen = [0.0], []

        def decode_starts(token):  # called first after the prefill: count decode only
            if not seen:
                spent[0], PRODUCT_TICKS[0] = 0.0, 0
            seen.append(token)

        with thread_setting(self.threads), timed_products(spent):
            result = generate(self.llm.model, prompt, tokens, on_token=decode_starts,
                              adapt_threads=self.threads == "auto")
        products = spent[0] + float(PRODUCT_TICKS[0]) * tick_s
        return 1e3 * (result.decode_seconds - products) / max(1, len(result.ids) - 1)

    def first_ids(self, prompt, tokens: int) -> list[int]:
        return list(generate(self.llm.model, prompt, tokens).ids)

    def bytes_per_token(self, mean_position: float) -> float:
        return self.llm.model.weight_bytes() + kv_bytes_per_token(self.config, mean_position)

    def perplexity(self, windows):
        return perplexity(self.llm.model, windows, progress=False, keep_argmax=True)


def fast_pairs(runs: list) -> dict[str, str]:
    """Each fast-mode run (all block layers qpanel) -> the label of the first exact run of the
    same model (same path, thread setting and step, another format), where there is one."""
    pairs = {}
    for run in runs:
        if run.formats != "qpanel":
            continue
        exact = [other.label for other in runs if other.llm.path == run.llm.path
                 and other.formats != "qpanel" and other.threads == run.threads
                 and other.step == run.step]
        if exact:
            pairs[run.label] = exact[0]
    return pairs


class LlamaCppRun:
    """One llama.cpp variant of a GGUF (:class:`npsparse.benchmarks.llama_cpp.LlamaCppModel`)."""

    formats = "llama.cpp"

    def __init__(self, label: str, path, threads: str, config, context: int):
        from npsparse.benchmarks.llama_cpp import LlamaCppModel

        self.label, self.path, self.threads, self.config = label, path, threads, config
        self.count = len(allowed_cpus()) if threads == "auto" else int(threads)
        self.model = LlamaCppModel(path, self.count, context)

    def decode(self, prompt, tokens: int) -> tuple[float, float]:
        tok_s, prefill, _ = self.model.decode(prompt, tokens)
        return tok_s, prefill

    def first_ids(self, prompt, tokens: int) -> list[int]:
        return self.model.decode(prompt, tokens)[2]

    def bytes_per_token(self, mean_position: float) -> float:
        return self.model.weight_bytes + self.model.kv_bytes_per_token(self.config,
                                                                       mean_position)

    def perplexity(self, windows):
        return perplexity(npsparse.load(self.path).model, windows, progress=False)


def llama_cpp_runs(args, config, context: int) -> list[LlamaCppRun]:
    """The ``--llama-cpp`` variants, one run per thread setting, re-quantized files cached."""
    from npsparse.benchmarks.llama_cpp import VARIANTS, describe, import_llama_cpp, variant_files
    from npsparse.io import resolve_model_path

    llama_cpp = import_llama_cpp()
    source = resolve_model_path(args.llama_cpp_gguf)
    if source.suffix != ".gguf":
        raise NpsparseError(f"--llama-cpp-gguf must be a .gguf file, got {source}")
    files = variant_files(source, tuple(args.llama_cpp) or VARIANTS, args.llama_cpp_cache,
                          len(allowed_cpus()))
    print(f"llama.cpp: {describe(llama_cpp)}", file=sys.stderr)
    runs = []
    for name, path in files.items():
        for threads in args.threads:
            suffix = "" if args.threads == ["auto"] else f" threads={threads}"
            runs.append(LlamaCppRun(f"llama.cpp {name}{suffix}", path, threads, config, context))
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
    parser.add_argument("--steps", nargs="+", default=["token"], choices=["token", "block"],
                        help="decode steps to run each model with: token (one compiled call "
                             "per block, the default) and/or block (the per-block steps)")
    parser.add_argument("--activations", nargs="+", default=["fp32"], choices=["fp32", "int8"],
                        help="fp32 and/or int8 (the lossy fast mode: the model packed as qpanel); "
                             "a qpanel run prints its perplexity change and top-1 agreement "
                             "against an exact run of the same model")
    parser.add_argument("--busy", action="store_true",
                        help="also time every run beside one CPU-bound process")
    parser.add_argument("--llama-cpp", nargs="*", default=None, metavar="VARIANT",
                        help="also time llama.cpp on the same GGUF: shipped, Q8_0, F16 "
                             "(default: all three; needs npsparse[compare])")
    parser.add_argument("--llama-cpp-gguf", default="smollm2",
                        help="the GGUF llama.cpp runs (default: the embedded SmolLM2)")
    parser.add_argument("--llama-cpp-cache", type=Path,
                        default=Path.home() / ".cache" / "npsparse" / "llama-cpp",
                        help="folder of the re-quantized variants (written once)")
    parser.add_argument("--ppl-windows", type=int, default=None,
                        help="perplexity of every run on this many pydoc eval windows "
                             "(default: 40 with --llama-cpp, else 0)")
    args = parser.parse_args(argv)
    check_threads(args.threads)
    argv = list(sys.argv[1:] if argv is None else argv)
    fast = "int8" in args.activations or any(m.endswith("@qpanel") for m in args.models)
    if args.ppl_windows is None:
        args.ppl_windows = 40 if args.llama_cpp is not None or fast else 0
    if args.ppl_windows < 0:
        raise SystemExit(f"{PROG}: error: --ppl-windows must be 0 or more")
    if args.llama_cpp is not None:
        from npsparse.benchmarks.llama_cpp import import_llama_cpp

        import_llama_cpp()  # before any model is loaded: a missing extra fails at once

    from npsparse.packing import apply_format, layer_formats

    runs = []
    pairs = parse_runs(args.models, args.format)
    for model, fmt, activations in [(m, f, a) for m, f in pairs for a in args.activations]:
        if activations == "int8" and fmt == "dense" and model == "smollm2":
            continue  # the dense checkpoint has no zeros: its fast mode is not a sparse model
        llm = npsparse.load(model)
        if activations == "int8":
            fmt = "qpanel"
        if fmt != "dense":
            info = apply_format(llm.model, fmt)
            print(f"{model}: packed {fmt} in {info['seconds']:.1f} s: {info['formats']}, head "
                  f"{info['head']}", file=sys.stderr)
        # What runs, not what was asked: a packed folder "@dense" runs in its stored formats,
        # so it is labelled by them and never becomes the dense fp32 baseline.
        formats = layer_formats(llm.model)
        label = f"{model}@{formats if fmt == 'dense' else fmt}"
        for threads in args.threads:
            for step in args.steps:
                suffix = "" if args.threads == ["auto"] else f" threads={threads}"
                suffix += "" if args.steps == ["token"] else f" step={step}"
                runs.append(NpsparseRun(label + suffix, formats, llm, threads, step))
    exact_of = fast_pairs(runs)
    first = runs[0].llm
    prompt = first.encode("The Python standard library documentation describes")
    if args.llama_cpp is not None:
        runs += llama_cpp_runs(args, first.config, len(prompt) + args.tokens + 8)
    for run in runs:  # warm-up: compile kernels, fault in pages
        run.decode(prompt, 4)
    before = measure_read_bandwidth()
    best = {run.label: (0.0, 0.0) for run in runs}
    busy = {run.label: 0.0 for run in runs}
    for _ in range(args.repeats):
        for run in runs:
            tok_s, prefill = run.decode(prompt, args.tokens)
            best[run.label] = (max(best[run.label][0], tok_s), max(best[run.label][1], prefill))
        if args.busy:
            with busy_process():
                for run in runs:
                    busy[run.label] = max(busy[run.label], run.decode(prompt, args.tokens)[0])
    after = measure_read_bandwidth()
    bandwidth = max(before.best, after.best)
    tick_s = tick_seconds()
    outside = {run.label: min(run.outside_products(prompt, args.tokens, tick_s)
                              for _ in range(args.repeats))
               for run in runs if isinstance(run, NpsparseRun)}
    baseline = {}  # the first run whose block layers are all float32, and all bf16
    for run in runs:
        baseline.setdefault(run.formats, best[run.label][0])
    ppl, paired = {}, {}
    if args.ppl_windows:
        seqlen = min(512, first.config.max_position)
        windows = first.eval_windows("pydoc", seqlen=seqlen, windows=args.ppl_windows)
        results = {run.label: run.perplexity(windows) for run in runs}
        ppl = {label: result.ppl for label, result in results.items()}
        for label, exact in exact_of.items():  # same windows: paired change and top-1 agreement
            change = 100 * (results[label].ppl / results[exact].ppl - 1)
            agree = float(np.mean(results[label].argmax == results[exact].argmax))
            paired[label] = (change, agree)
    same = {}  # leading generated tokens equal to the first run's (greedy, same prompt ids)
    if args.llama_cpp is not None:
        reference = runs[0].first_ids(prompt, args.tokens)
        for run in runs:
            ids = run.first_ids(prompt, args.tokens)
            same[run.label] = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b),
                                   min(len(ids), len(reference)))

    print(cpu_line())
    print(f"{args.tokens} tokens after a {len(prompt)}-token prompt, best of {args.repeats} "
          "interleaved runs")
    print(f"bandwidth: {before} (before); {after} (after); roofline uses {bandwidth / 1e9:.1f} GB/s")
    if ppl:
        print(f"perplexity: the first {args.ppl_windows} windows of {seqlen} tokens of the pydoc "
              "text, no BOS")
    print()
    extra = [(" busy tok/s | busy / quiet |", "---|---|")] if args.busy else []
    if ppl:
        extra.append((f" ppl ({args.ppl_windows} windows) |", "---|"))
    if same:
        extra.append((f" tokens equal to row 1 (of {args.tokens}) |", "---|"))
    if paired:
        extra.append((" ppl change vs exact | top-1 agreement vs exact |", "---|---|"))
    print("| model@format | MB read/token | decode tok/s | roofline tok/s | % of roofline "
          "| x dense fp32 | x bf16 | prefill tok/s | ms/token outside products |"
          + "".join(head for head, _ in extra))
    print("|---|---|---|---|---|---|---|---|---|" + "".join(rule for _, rule in extra))
    mean_pos = len(prompt) + args.tokens / 2
    for run in runs:
        label = run.label
        tok_s, prefill = best[label]
        per_token = run.bytes_per_token(mean_pos)
        roof = bandwidth / per_token
        vs = [f"{tok_s / baseline[b]:.2f}" if b in baseline else "" for b in ("dense", "bf16")]
        cells = f" {busy[label]:.1f} | {busy[label] / tok_s:.2f} |" if args.busy else ""
        cells += f" {ppl[label]:.4f} |" if ppl else ""
        cells += f" {same[label]} |" if same else ""
        if paired:
            cells += (f" {paired[label][0]:+.2f}% | {100 * paired[label][1]:.2f}% |"
                      if label in paired else " | |")
        glue = f"{outside[label]:.3f}" if label in outside else ""
        print(f"| {label} | {per_token / 1e6:.1f} | {tok_s:.1f} | {roof:.1f} | "
              f"{100 * tok_s / roof:.0f}% | {vs[0]} | {vs[1]} | {prefill:.0f} | {glue} |" + cells)
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
