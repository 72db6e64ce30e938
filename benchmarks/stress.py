"""Randomized stress on real rank processes: ``python benchmarks/stress.py [options]`` (``--help`` for them).

The driver is :mod:`fastdeploy_pd_fix.tools.stress`; this script only runs it.
"""

import sys

from fastdeploy_pd_fix.tools.stress import main

if __name__ == "__main__":
    sys.exit(main())
