"""Fake ``python -m fastdeploy.router.launch --port P --splitwise``: becomes the stub router on port P."""

import argparse
import os
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parents[3]

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--splitwise", action="store_true", required=True)
    args = parser.parse_args()
    stub = str(STUBS / "stub_router.py")
    os.execv(sys.executable, [sys.executable, stub, "--port", str(args.port)])
