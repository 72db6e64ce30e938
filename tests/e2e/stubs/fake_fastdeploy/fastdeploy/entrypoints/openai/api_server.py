"""Fake ``python -m fastdeploy.entrypoints.openai.api_server``: becomes a stub server on ``--port``.

The prefill server writes agreeing cache messager logs of two ranks (rank 1 with early layer-0 signals) and logs an
engine-side abort notice for each stream its client closes. With the fix on, it logs for each request sent straight
to it (an orphan) the engine's orphan notice and the messagers' dropped layer-0 task lines, as the plugin's engine
side makes a prefill instance do; ``FD_E2E_FAKE_ORPHANS`` (for the harness tests only) changes that: ``unannounced``
(no notice and no drop, as when the engine side is not active) or ``undropped`` (notices, but no messager drops).
The decode server never answers when the fix is off (``FD_PD_FIX=0``, or the ``observe``/``upstream`` modes), which
imitates the deadlock the A/B test expects.
"""

import argparse
import os
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parents[4]
UNFIXED = os.environ.get("FD_PD_FIX") == "0" or os.environ.get("FD_PD_FIX_MODE") in ("observe", "upstream")
ORPHAN_OPTIONS = {
    "announced": ["--orphan-notices"],
    "unannounced": [],
    "undropped": ["--orphan-notices", "--no-orphan-drops"],
}
ORPHANS = os.environ.get("FD_E2E_FAKE_ORPHANS", "announced")
# The environment the test gives each server, echoed to its output for the harness test to check.
SHOWN_PREFIXES = ("FD_PD_FIX", "ENABLE_V1_")
SHOWN = ("CUDA_VISIBLE_DEVICES", "FD_DETERMINISTIC_MODE", "FD_ENABLE_REQUEST_DISCONNECT_STOP_INFERENCE", "NO_PROXY")

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--splitwise-role", default="mixed")
    parser.add_argument("--router")
    args, _ = parser.parse_known_args()  # model, ports, TP size ...: what FastDeploy would need, not the stub
    shown = [name for name in os.environ if name.startswith(SHOWN_PREFIXES) or name in SHOWN]
    settings = sorted(f"{name}={os.environ[name]}" for name in shown)
    print(f"fake api_server {args.splitwise_role}: {' '.join(sys.argv[1:])} | {' '.join(settings)}", flush=True)
    stub = [sys.executable, str(STUBS / "stub_server.py"), "--port", str(args.port), "--role", args.splitwise_role]
    if args.router:
        stub += ["--router", args.router]
    if args.splitwise_role == "prefill":
        stub += ["--cache-messager-logs", "agree", "--abort-notices"]
        if not UNFIXED:
            stub += ORPHAN_OPTIONS[ORPHANS]
    if args.splitwise_role == "decode" and UNFIXED:
        stub += ["--never-answer"]
    os.execv(sys.executable, stub)
