"""Fake ``python -m fastdeploy.entrypoints.openai.api_server``: becomes a stub server on ``--port``.

The prefill server writes agreeing cache messager logs of two ranks. The decode server never answers when the
fix is off (``FD_PD_FIX=0``, or the ``observe``/``upstream`` modes), which imitates the deadlock the A/B test expects.
"""

import argparse
import os
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parents[4]
UNFIXED = os.environ.get("FD_PD_FIX") == "0" or os.environ.get("FD_PD_FIX_MODE") in ("observe", "upstream")

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--splitwise-role", default="mixed")
    parser.add_argument("--router")
    args, _ = parser.parse_known_args()  # model, ports, TP size ...: what FastDeploy would need, not the stub
    plugin_env = sorted(f"{name}={value}" for name, value in os.environ.items() if name.startswith("FD_PD_FIX"))
    print(f"fake api_server {args.splitwise_role}: {' '.join(sys.argv[1:])} | {' '.join(plugin_env)}", flush=True)
    stub = [sys.executable, str(STUBS / "stub_server.py"), "--port", str(args.port), "--role", args.splitwise_role]
    if args.router:
        stub += ["--router", args.router]
    if args.splitwise_role == "prefill":
        stub += ["--cache-messager-logs", "agree"]
    if args.splitwise_role == "decode" and UNFIXED:
        stub += ["--never-answer"]
    os.execv(sys.executable, stub)
