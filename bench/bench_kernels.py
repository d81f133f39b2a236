"""Thin wrapper: the benchmark lives in the package (npsparse.benchmarks.kernels) so that
``npsparse bench kernels``
runs it from any install. Same arguments; see its docstring."""

import sys

from npsparse.benchmarks.kernels import main

if __name__ == "__main__":
    sys.exit(main())
