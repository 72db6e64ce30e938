"""A FastDeploy-shaped stand-in and a multi-process harness that runs it (FastDeploy is not installable here).

``STANDIN_ROOT`` is the directory to put on ``PYTHONPATH`` so that ``import fastdeploy`` finds the stand-in.
"""

from pathlib import Path

STANDIN_ROOT = Path(__file__).resolve().parent
