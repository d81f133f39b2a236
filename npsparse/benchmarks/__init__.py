"""Benchmarks that ship with the package, so that ``npsparse bench`` runs them anywhere.

- :mod:`npsparse.benchmarks.kernels`: every kernel format x sparsity x matrix shape against the
  read bandwidth measured in the same run, dense fp32/bf16 and scipy.sparse
  (``npsparse bench kernels``, ``python bench/bench_kernels.py``).
- :mod:`npsparse.benchmarks.decode`: decode tokens/s of whole models against the roofline
  (``npsparse bench decode``, ``python bench/bench_decode.py``).
"""

FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vbmi2", "avx512vnni",
            "avx512bf16", "avx512fp16", "amx-tile", "amx-bf16", "amx-int8")


def cpu_line() -> str:
    """The CPU, the features the kernels look at, and the kernel paths chosen from them.

    Returns
    -------
    str
        One line: the CPU model and LLVM's name for it, which of :data:`FEATURES` it has, and the
        bitmask expand, panel expand and Q8_0 GEMV paths every benchmark on it runs.
    """
    import llvmlite.binding as llvm_binding

    from npsparse.kernels import _panel_simd, _simd, q8
    from npsparse.roofline import cpu_name

    have = set(llvm_binding.get_host_cpu_features().flatten().split(","))
    used = [name for name in FEATURES if f"+{name}" in have]
    bitmask = "avx512 register expand" if _simd._HOST_AVX512 else "portable expandload"
    return (f"CPU: {cpu_name()} (LLVM: {llvm_binding.get_host_cpu_name()}); features: "
            f"{' '.join(used) or 'none of ' + ' '.join(FEATURES)}; paths: bitmask "
            f"{bitmask}, panel {_panel_simd.HOST_MODE}, Q8_0 GEMV {q8.DEFAULT_PATH}")
