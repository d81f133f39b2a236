"""Benchmarks that ship with the package, so that ``npsparse bench`` runs them anywhere.

- :mod:`npsparse.benchmarks.kernels`: every kernel format x sparsity x matrix shape against the
  read bandwidth measured in the same run, dense fp32/bf16 and scipy.sparse
  (``npsparse bench kernels``, ``python bench/bench_kernels.py``).
- :mod:`npsparse.benchmarks.decode`: decode tokens/s of whole models against the roofline
  (``npsparse bench decode``, ``python bench/bench_decode.py``).
"""
