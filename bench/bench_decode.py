"""Thin wrapper: the benchmark lives in the package (npsparse.benchmarks.decode) so that
``npsparse bench decode``
runs it from any install. Same arguments; see its docstring."""

import sys

from npsparse.benchmarks.decode import main

if __name__ == "__main__":
    sys.exit(main())
