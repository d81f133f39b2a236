"""Sparse GEMV/GEMM kernels against this machine's read bandwidth, dense baselines and scipy.

    npsparse bench kernels [--quick] [--shapes 4096x4096 ...] [--formats bitmask nm ...]
        [--sparsities 50 70 2:4 ...] [--threads 2] [--tokens 8 32] [--out FILE.md] [--plot FILE.png]

For every shape x sparsity x format: best time per product over ``--passes`` passes, the bytes the
format reads per product, achieved GB/s and % of the read bandwidth ``B`` measured in the same run
(parallel float32 sum over >= 256 MiB, best of several passes), and speedups over dense float32
(numpy BLAS), dense bf16 and scipy.sparse CSR (float32, single-threaded) at the same sparsity.
Weights are cold, as in decode where the model is far larger than the cache: each timed pass cycles
through enough copies of the packed layer to exceed ``--cold-bytes`` (default 3 x 32 MiB L3).
Masks are uniform random (unstructured) or magnitude N:M; weights are standard normal.
``monarch4-bf16`` is not a mask format: it runs on the dense ("0") rows of every shape that
4 blocks fit, as a Monarch matrix with random bf16 factors (``2 min(N, K) (N + K) / 4`` bytes;
the product's cost does not depend on the values, so no projection is computed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
import scipy.sparse

import npsparse.kernels as nk
from npsparse.benchmarks import cpu_line
from npsparse.io.hf_dir import usual_mode
from npsparse.roofline import parallel_sum

PROG = "npsparse bench kernels"
COLD_CACHE_ENV = "NPSPARSE_BENCH_COLD_CACHE"

SHAPES = {  # name: (N, K) of W [N, K]
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "llama7b": [(4096, 4096), (11008, 4096)],
}
SPARSITIES = ["0", "50", "60", "70", "80", "90", "2:4", "4:8"]
# label: (format, options); N:M formats only run on N:M masks of their own pattern.
FORMATS = {
    "fp32": ("dense", {}),
    "bf16": ("bf16", {}),
    "csr-bf16": ("csr", {"values": "bf16"}),
    "csr-fp32": ("csr", {"values": "fp32"}),
    "bitmask-bf16": ("bitmask", {"values": "bf16"}),
    "bitmask-int8": ("bitmask", {"values": "int8"}),
    "panel-bf16": ("panel", {"values": "bf16"}),
    "qpanel": ("qpanel", {"values": "int8"}),
    "nm-bf16": ("nm", {"values": "bf16"}),
    "nm-int8": ("nm", {"values": "int8"}),
    "monarch4-bf16": ("monarch", {"blocks": 4, "values": "bf16"}),
}
DENSE = ("fp32", "bf16")


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def make_mask(rng, shape, sparsity: str, weight) -> np.ndarray:
    """keep [N, K] bool: uniform random at ``sparsity`` %, or magnitude N:M ("2:4")."""
    if ":" in sparsity:
        n, m = (int(p) for p in sparsity.split(":"))
        groups = np.abs(weight).reshape(shape[0], shape[1] // m, m)
        rank = np.argsort(np.argsort(groups, axis=2), axis=2)
        return (rank >= n).reshape(shape)
    return rng.random(shape, dtype=np.float32) >= float(sparsity) / 100


def time_round_robin(candidates: dict, passes: int, min_calls: int) -> dict:
    """Per label: (best, median) seconds per call, passes interleaved across labels.

    ``candidates[label]`` is a list of zero-argument callables, one per copy of the weights; one
    pass calls each once (cold weights). Interleaving the labels pass by pass exposes them all to
    the same background load, so their ratios stay meaningful on a shared machine. Every call is
    timed on its own: ``best`` is the fastest call, ``median`` the median call. Passes repeat until
    every label has at least ``min_calls`` calls: on a shared 2-core machine a parallel call stalls
    whenever another process holds a core, so the fastest of many calls is the clean measurement.
    """
    for calls in candidates.values():  # warm-up: compile, fault in pages
        for call in calls:
            call()
    samples = {label: [] for label in candidates}
    fewest_copies = min(len(calls) for calls in candidates.values())
    for _ in range(max(passes, -(-min_calls // fewest_copies))):
        for label, calls in candidates.items():
            for call in calls:
                start = time.perf_counter()
                call()
                samples[label].append(time.perf_counter() - start)
    return {label: (min(t), statistics.median(t)) for label, t in samples.items()}


def per_call_bandwidth(nbytes: int = 512 * 2**20, chunk: int = 32 * 2**20, passes: int = 8):
    """(best, median) bytes/s of single calls, each reading one cold ``chunk`` of ``nbytes``.

    The same parallel float32 read as :func:`npsparse.roofline.measure_read_bandwidth`, timed per
    32 MiB call like the kernels (whose weights are read cold, call by call), so that a call that
    ran while another process held a core does not count against the best.
    """
    array = np.ones((nbytes // chunk, 64, chunk // 256), dtype=np.float32)
    for part in array:  # compile, fault in the pages
        parallel_sum(part)
    times = []
    for _ in range(passes):
        for part in array:
            start = time.perf_counter()
            parallel_sum(part)
            times.append(time.perf_counter() - start)
    return chunk / min(times), chunk / statistics.median(times)


PROBE = "read-probe"  # label of the bandwidth probe inside the round robin


class Roofline:
    """The bandwidth B that "% of B" divides by: the best of every probe in this run.

    Besides the large probes before and after, one probe per shape and sparsity runs inside the
    same round robin as the kernels (a parallel read of as many bytes as dense bf16 reads): this
    machine's bandwidth moves between about 45 and 80 GB/s within minutes, and a kernel timed
    in a fast minute must not be divided by a B measured in a slow one.
    """

    def __init__(self):
        self.notes = []
        self.interleaved = []
        self.best = 0.0

    def add(self, name: str, best: float, median: float):
        """Add one named probe's result (listed in the summary)."""
        self.notes.append(f"{name}: {best / 1e9:.1f} GB/s best, {median / 1e9:.1f} median")
        self.best = max(self.best, best)

    def add_interleaved(self, best: float):
        """Add one probe of the kernels' round robin (counted, and summarised as a range)."""
        self.interleaved.append(best)
        self.best = max(self.best, best)

    def __str__(self):
        notes = list(self.notes)
        if self.interleaved:
            notes.append(f"{len(self.interleaved)} probes interleaved with the kernels, one per "
                         f"shape and sparsity: {min(self.interleaved) / 1e9:.1f}-"
                         f"{max(self.interleaved) / 1e9:.1f} GB/s best")
        return f"B = {self.best / 1e9:.1f} GB/s (best of: " + "; ".join(notes) + ")"


def monarch_layer(rng, shape, blocks: int, values: str):
    """A Monarch layer of ``shape`` with random factors, or None when ``blocks`` does not fit."""
    from npsparse.kernels.monarch import MonarchLinear, monarch_sizes

    try:
        sizes = monarch_sizes(shape, blocks)
    except nk.NpsparseError:
        return None
    right = rng.standard_normal(sizes.right_shape, dtype=np.float32)
    left = rng.standard_normal(sizes.left_shape, dtype=np.float32)
    return MonarchLinear.from_factors(right, left, values=values)


def copies_for(nbytes: int, cold_bytes: int, max_copies: int = 256) -> int:
    return int(min(max_copies, max(1, -(-cold_bytes // max(nbytes, 1)))))


def clone(layer):
    """An independent copy of a layer's arrays (its own memory, so the cache cannot share it)."""
    arrays, meta = nk.to_arrays(layer)
    return nk.from_arrays({name: a.copy() for name, a in arrays.items()}, meta)


def first_call_times(tokens: list[int]) -> list[tuple[str, float]]:
    """Seconds for the first product of each format (a compile, or a load from Numba's cache)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    keep = make_mask(rng, weight.shape, "2:4", weight)
    out = []
    for label, (fmt, options) in FORMATS.items():
        if fmt == "dense":
            continue
        options = dict(options, pattern="2:4") if fmt == "nm" else options
        layer = (monarch_layer(rng, weight.shape, **options) if fmt == "monarch" else
                 nk.pack(weight, keep, fmt, **options))
        for n_tokens in [1] + ([max(tokens)] if tokens else []):
            x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
            start = time.perf_counter()
            layer(x)
            out.append((f"{label} {'GEMV' if n_tokens == 1 else 'GEMM'}",
                        time.perf_counter() - start))
    return out


def run_shape(shape, sparsities, formats, args, bandwidth, rng, rows_out):
    n_rows, k_cols = shape
    weight = rng.standard_normal(shape, dtype=np.float32)
    xs = {n_tokens: rng.standard_normal((n_tokens, k_cols), dtype=np.float32)
          for n_tokens in [1, *args.tokens]}
    for sparsity in sparsities:
        if ":" in sparsity and k_cols % int(sparsity.split(":")[1]):
            continue
        keep = make_mask(rng, shape, sparsity, weight)
        layers = {}
        for label in formats:
            fmt, options = FORMATS[label]
            if fmt == "nm" and ":" not in sparsity:
                continue
            if (fmt == "monarch") != (sparsity == "0") and label not in DENSE:
                continue  # mask formats on masks, Monarch on the dense rows
            if fmt == "nm":
                options = dict(options, pattern=sparsity)
            layer = (monarch_layer(rng, shape, **options) if fmt == "monarch" else
                     nk.pack(weight, keep, fmt, **options))
            if layer is None:  # b does not fit this shape
                continue
            n_copies = copies_for(layer.nbytes, args.cold_bytes)
            layers[label] = [layer] + [clone(layer) for _ in range(n_copies - 1)]
        times = {label: {"nbytes": copies[0].nbytes, "nnz": getattr(copies[0], "nnz", None)}
                 for label, copies in layers.items()}
        for n_tokens, x in xs.items():
            calls = {label: [lambda c=c, x=x: c(x) for c in copies]
                     for label, copies in layers.items()}
            if n_tokens == 1:  # the roofline probe, interleaved with the kernels it bounds
                probe_bytes = 2 * n_rows * k_cols  # as much as dense bf16 reads
                probes = [np.ones((64, max(1, probe_bytes // 256)), dtype=np.float32)
                          for _ in range(copies_for(probe_bytes, args.cold_bytes))]
                calls[PROBE] = [lambda a=a: parallel_sum(a) for a in probes]
                probe_nbytes = probes[0].nbytes
            if n_tokens == 1 and sparsity != "0" and args.scipy:
                a = scipy.sparse.csr_matrix(np.where(keep, weight, np.float32(0)))
                nbytes = a.data.nbytes + a.indices.nbytes + a.indptr.nbytes
                copies = [a] + [a.copy() for _ in range(copies_for(nbytes, args.cold_bytes) - 1)]
                vec = x[0]
                calls["scipy-csr"] = [lambda c=c: c @ vec for c in copies]
                times["scipy-csr"] = {"nbytes": nbytes}
            for label, timing in time_round_robin(calls, args.passes, args.calls).items():
                if label == PROBE:
                    bandwidth.add_interleaved(probe_nbytes / timing[0])
                    continue
                times[label][n_tokens] = timing
            calls.clear()
        layers.clear()
        for label, entry in times.items():
            density = (entry["nnz"] / (n_rows * k_cols) if label.startswith("monarch")
                       else keep.mean())  # a Monarch layer's parameters per dense weight
            rows_out.append(make_row(shape, sparsity, density, label, entry, times,
                                     bandwidth, args.tokens))
            print_row(rows_out[-1], args.tokens, file=sys.stderr, flush=True)  # progress


def make_row(shape, sparsity, density, label, entry, times, bandwidth, tokens):
    n_rows, k_cols = shape
    best = entry[1][0]
    row = {
        "shape": f"{n_rows}x{k_cols}", "sparsity": sparsity, "density": density,
        "format": label, "bytes_per_weight": entry["nbytes"] / (n_rows * k_cols),
        "us": best * 1e6, "us_median": entry[1][1] * 1e6,
        "pct_bw_median": 100 * entry["nbytes"] / entry[1][1] / bandwidth.best,
        "gbs": entry["nbytes"] / best / 1e9,
        "pct_bw": 100 * entry["nbytes"] / best / bandwidth.best,
    }
    for base in ("fp32", "bf16", "scipy-csr"):
        row[f"vs_{base}"] = times[base][1][0] / best if base in times else float("nan")
        row[f"vs_{base}_median"] = (times[base][1][1] / entry[1][1] if base in times
                                    else float("nan"))
    for n_tokens in tokens:
        if n_tokens in entry:
            row[f"gemm{n_tokens}_us"] = entry[n_tokens][0] * 1e6
            row[f"gemm{n_tokens}_vs_fp32"] = (times["fp32"][n_tokens][0] / entry[n_tokens][0]
                                              if "fp32" in times else float("nan"))
    return row


def header(tokens) -> str:
    cols = ["shape", "sparsity", "format", "B/weight", "GEMV us", "median us", "GB/s", "% of B",
            "x fp32", "x bf16", "x bf16 (med)", "x scipy"]
    for n_tokens in tokens:
        cols += [f"GEMM T={n_tokens} us", f"T={n_tokens} x fp32"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def fmt_ratio(value: float) -> str:
    return "" if value != value else f"{value:.2f}"


def print_row(row, tokens, file, flush=False):
    sparsity = row["sparsity"] + ("" if ":" in row["sparsity"] else "%")
    cells = [row["shape"], sparsity, row["format"], f"{row['bytes_per_weight']:.3f}",
             f"{row['us']:.0f}", f"{row['us_median']:.0f}", f"{row['gbs']:.1f}",
             f"{row['pct_bw']:.0f}", fmt_ratio(row["vs_fp32"]), fmt_ratio(row["vs_bf16"]),
             fmt_ratio(row["vs_bf16_median"]), fmt_ratio(row["vs_scipy-csr"])]
    for n_tokens in tokens:
        us = row.get(f"gemm{n_tokens}_us")
        cells += ["" if us is None else f"{us:.0f}",
                  fmt_ratio(row.get(f"gemm{n_tokens}_vs_fp32", float("nan")))]
    print("| " + " | ".join(cells) + " |", file=file, flush=flush)


def floors(rows) -> list[str]:
    """The targets for the LLaMA-7B shapes and Monarch, checked against this run's numbers."""
    lines = []
    for row in rows:
        if row["format"].startswith("monarch"):
            lines.append(f"{row['shape']}: {row['format']} ({row['density']:.1%} of the dense "
                         f"parameters) {row['vs_bf16']:.2f}x dense bf16 (floor 1.5x; "
                         f"{row['vs_bf16_median']:.2f}x by median calls), "
                         f"{row['pct_bw']:.0f}% of B")
    for shape in ("4096x4096", "11008x4096"):
        sel = [r for r in rows if r["shape"] == shape]
        if not sel:
            continue
        bf16 = [r for r in sel if r["format"] == "bf16"]
        if bf16:
            pct = max(r["pct_bw"] for r in bf16)
            pct_median = max(r["pct_bw_median"] for r in bf16)
            lines.append(f"{shape}: dense bf16 GEMV at {pct:.0f}% of B best call, {pct_median:.0f}% "
                         "median call (floor 85%)")
        for sparsity, floor in (("50", 1.2), ("70", 1.8), ("2:4", None)):
            cand = [r for r in sel if r["sparsity"] == sparsity and r["format"] not in DENSE
                    and r["format"] != "scipy-csr"]
            if not cand:
                continue
            best = max(cand, key=lambda r: r["vs_bf16"])
            target = f" (floor {floor}x)" if floor else ""
            lines.append(f"{shape} @ {sparsity}: best {best['format']} {best['vs_bf16']:.2f}x "
                         f"bf16{target} ({best['vs_bf16_median']:.2f}x by median calls), "
                         f"{best['vs_scipy-csr']:.2f}x scipy (floor 2x), "
                         f"{best['vs_fp32']:.2f}x fp32, {best['pct_bw']:.0f}% of B")
            lossless = [r for r in cand if "int8" not in r["format"]]
            b2 = max(lossless, key=lambda r: r["vs_bf16"]) if lossless else best
            if b2 is not best:
                lines.append(f"{shape} @ {sparsity}: best bf16-valued {b2['format']} "
                             f"{b2['vs_bf16']:.2f}x bf16 ({b2['vs_bf16_median']:.2f}x median), "
                             f"{b2['vs_scipy-csr']:.2f}x scipy, "
                             f"{b2['pct_bw']:.0f}% of B")
    return lines


def report(rows, args, bandwidth, compile_times, file):
    """The markdown table and the floor checks; % of B against ``bandwidth.best``."""
    print(f"\nnpsparse kernel bench: {numba.get_num_threads()} threads; {bandwidth}. "
          f"Command: npsparse bench kernels {' '.join(args.argv)}\n", file=file)
    print(cpu_line() + "\n", file=file)
    print("First call (compile, or load from Numba's cache): " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in compile_times) + "\n", file=file)
    print(header(args.tokens), file=file)
    for row in rows:
        print_row(row, args.tokens, file=file)
    print("", file=file)
    for line in floors(rows):
        print(f"- {line}", file=file)


def plot(rows, path, bandwidth):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if r["shape"] == shape and r["sparsity"] != "0"]
        order = [s for s in SPARSITIES if any(r["sparsity"] == s for r in sel)]
        for label in dict.fromkeys(r["format"] for r in sel):
            if label in DENSE:
                continue
            pts = [(order.index(r["sparsity"]), r["vs_bf16"]) for r in sel if r["format"] == label]
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(order)), [s if ":" in s else s + "%" for s in order])
        ax.set_title(f"GEMV {shape}")
        ax.set_ylabel("speedup over dense bf16")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"npsparse GEMV speedup over dense bf16 (best calls), "
                 f"{numba.get_num_threads()} threads, B = {bandwidth.best / 1e9:.1f} GB/s",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def shape_arg(text: str) -> str:
    """A ``--shapes`` entry: a preset name, or "NxK" with N and K at least 1."""
    if text in SHAPES:
        return text
    message = (f"{text!r} is neither NxK with N, K >= 1 (e.g. 4096x4096) nor a preset "
               f"({', '.join(SHAPES)})")
    try:
        n, k = parse_shape(text)
    except ValueError:  # not two parts, or a part that is not an integer
        raise argparse.ArgumentTypeError(message) from None
    if n < 1 or k < 1:
        raise argparse.ArgumentTypeError(message)
    return text


def sparsity_arg(text: str) -> str:
    """A ``--sparsities`` entry: percent pruned as in "50", or "N:M"; "0.5" is refused."""
    if ":" in text:
        try:
            nk.parse_pattern(text)
        except nk.NpsparseError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a percentage nor N:M") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"sparsity {text} is outside 0-99 (percent pruned)")
    if 0 < value < 1:
        raise argparse.ArgumentTypeError(f"sparsity {text} is in percent: did you mean "
                                         f"{value * 100:g}?")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "llama7b"], type=shape_arg,
                        help="NxK shapes or presets: " + ", ".join(SHAPES))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--sparsities", nargs="+", default=SPARSITIES, type=sparsity_arg,
                        help="percent pruned (0-99) or an N:M pattern such as 2:4")
    parser.add_argument("--tokens", nargs="*", type=int, default=[8, 32],
                        help="GEMM batch sizes T (besides T=1 GEMV)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--passes", type=int, default=5, help="at least this many passes")
    parser.add_argument("--calls", type=int, default=60,
                        help="at least this many timed calls per format and batch size")
    parser.add_argument("--cold-bytes", type=int, default=96 * 2**20)
    parser.add_argument("--bw-passes", type=int, default=15,
                        help="passes of the roofline probe (run before and after)")
    parser.add_argument("--no-scipy", dest="scipy", action="store_false")
    parser.add_argument("--quick", action="store_true",
                        help="4096x4096 and 576x576 only, 50/70%% and 2:4, 3 passes, T=8")
    parser.add_argument("--cold-cache", action="store_true",
                        help="compile into an empty Numba cache to time first-call compiles")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--plot", help="write a PNG plot of speedups over dense bf16 here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cold_cache and not os.environ.get(COLD_CACHE_ENV):
        # Numba reads NUMBA_CACHE_DIR at import, and it is imported by now: run again in a child
        # process with an empty cache so that the first calls time real compiles.
        env = {**os.environ, COLD_CACHE_ENV: "1",
               "NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="npsparse-numba-")}
        return subprocess.run([sys.executable, "-m", __name__, *args.argv], env=env).returncode
    if args.quick:
        args.shapes, args.sparsities = ["576x576", "4096x4096"], ["0", "50", "70", "2:4"]
        args.passes, args.calls, args.tokens = 3, 30, [8]
    for needed in DENSE:  # speedups need the baselines
        if needed not in args.formats:
            args.formats.insert(0, needed)
    nk.set_threads(args.threads)
    shapes = []
    for name in args.shapes:
        shapes += SHAPES[name] if name in SHAPES else [parse_shape(name)]

    compile_times = first_call_times(args.tokens)
    bandwidth = Roofline()
    probe = nk.measure_read_bandwidth(nbytes=512 * 2**20, passes=args.bw_passes)
    bandwidth.add("roofline probe before, 512 MiB passes", probe.best, probe.median)
    bandwidth.add("per-call probe before, 32 MiB calls over 512 MiB", *per_call_bandwidth())
    print(f"{numba.get_num_threads()} threads, {bandwidth}", file=sys.stderr)
    print(header(args.tokens), file=sys.stderr)
    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        run_shape(shape, args.sparsities, args.formats, args, bandwidth, rng, rows)
    before = bandwidth.best
    probe = nk.measure_read_bandwidth(nbytes=512 * 2**20, passes=args.bw_passes)
    bandwidth.add("roofline probe after", probe.best, probe.median)
    bandwidth.add("per-call probe after", *per_call_bandwidth())
    if bandwidth.best > before:  # % of B uses the best of all probes; recompute the rows
        for row in rows:
            row["pct_bw"] = 100 * row["gbs"] * 1e9 / bandwidth.best
            row["pct_bw_median"] = row["pct_bw"] * row["us"] / row["us_median"]
    report(rows, args, bandwidth, compile_times, sys.stdout)
    if args.out:
        def write_table(tmp):
            with open(tmp, "w") as f:
                report(rows, args, bandwidth, compile_times, f)
        write_atomically(args.out, write_table)
    if args.plot:
        write_atomically(args.plot, lambda tmp: plot(rows, tmp, bandwidth))
    return 0


def write_atomically(path: str, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``.

    An interrupted run leaves the previous file (or none), never a half-written one.

    Parameters
    ----------
    path : str
        Destination file; its suffix is kept on the temporary name (matplotlib reads it).
    write : callable
        ``write(tmp_path)`` writes the whole file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, usual_mode(0o666))  # mkstemp's file is private (0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
