"""Stub of a FastDeploy api_server for the harness tests (stdlib only, 127.0.0.1, any free port).

``GET /health``; ``POST /v1/completions`` and ``/v1/chat/completions`` answer a text that depends only on the
request (so a "PD" and a "mixed" stub agree, as greedy decoding should). Start-up handshake: with ``--port 0`` the
port is written to ``--port-file`` once the server listens; with ``--router`` or ``--router-port-file`` it then
registers with the router.

Misbehaviours on request: ``--register-after-router-polls N`` registers only once the router has answered N
``/registered_number`` polls (a late registration, by handshake rather than by sleeping), ``--never-register``,
``--never-answer`` (completion requests are accepted and never answered), ``--exit-code N`` (dies at start-up),
``--answer-suffix`` (different outputs), ``--cache-messager-logs agree|diverge`` (writes two ranks' cache messager
logs to ``$FD_LOG_DIR`` in the plugin's format, rank 1 with early layer-0 signals), ``--detached-child-file F``
(starts a child in a session of its own that listens on a port and writes "pid port" to F, as FastDeploy's cache
messagers run under setsid).

A streamed request (``"stream": true``) is answered with its status line and headers at once, then held: a client
that closes the connection aborts it (with ``--abort-notices`` the stub logs the engine-side notice line to
``$FD_LOG_DIR/engine.log``); one that waits gets the answer as one SSE event after ``--stream-hold-s``.

Orphans: with ``--orphan-notices``, a prefill stub that gets a request without ``disaggregate_info`` (sent straight
to it, not through the router) logs, before it answers, what a prefill instance with the plugin's engine side logs
for it: the engine's orphan notice line in ``$FD_LOG_DIR/engine.log``, and in each rank's cache messager log one
dropped layer-0 task line per chunk of the orphan (``--no-orphan-drops``: the messagers log none).
"""

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from stub_common import HOST, JsonHandler, announce_port, http_json, make_server, write_atomically

# Per rank: the early layer-0 signals its messager logs (the race counter of adapters/messager_step.py).
EARLY_SIGNALS = ([], [(0, 0, 256), (1, 0, 128)])
RANKS = len(EARLY_SIGNALS)
#: Prefill tokens per chunk of an orphan (the e2e test's default ``--max-num-batched-tokens``).
CHUNK_TOKENS = 256
#: The stub's logs are written by the request threads of one process: one writer at a time.
LOG_LOCK = threading.Lock()
#: The slot each orphan gets (the stub has no scheduler: one number per orphan; taken under LOG_LOCK).
ORPHAN_SLOTS = itertools.count()
BATCHES = {
    "agree": ([[(0, 256)], [(1, 128)]], [[(0, 256)], [(1, 128)]]),
    "diverge": ([[(0, 256)], [(1, 128)]], [[(0, 256)], [(1, 64)]]),
}


def answer_text(request: dict, suffix: str) -> str:
    prompt = request.get("prompt") or str(request.get("messages"))
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return f"stub answer {digest} ({len(prompt)} chars, max_tokens={request.get('max_tokens')}){suffix}"


def make_handler(args):
    class ServerHandler(JsonHandler):
        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {})
            else:
                self.reply(404, {"error": self.path})

        def do_POST(self):
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self.reply(404, {"error": self.path})
                return
            request = self.read_json()
            if args.never_answer:
                threading.Event().wait()  # hold the connection open forever, like a deadlocked engine
            if args.orphan_notices and args.role == "prefill" and "disaggregate_info" not in request:
                log_orphan(request, messagers_drop=not args.no_orphan_drops)
            text = answer_text(request, args.answer_suffix)
            if request.get("stream"):
                self.stream(request, text)
                return
            if self.path == "/v1/completions":
                choice = {"index": 0, "text": text, "finish_reason": "length"}
            else:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            self.reply(200, {"id": "stub", "choices": [choice]})

        def stream(self, request, text):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.flush()
            self.connection.settimeout(args.stream_hold_s)
            try:
                closed = self.connection.recv(1) == b""  # the client sends nothing more: b"" is its close
            except OSError:  # the hold ran out (socket.timeout), or a reset
                closed = False
            if closed:
                if args.abort_notices:
                    log_abort_notice(request)
                return
            event = {"choices": [{"index": 0, "text": text, "finish_reason": "length"}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())

    return ServerHandler


def log_abort_notice(request: dict) -> None:
    """The engine-side notice a prefill engine with the plugin logs when a request is aborted."""
    digest = hashlib.sha256(str(request.get("prompt")).encode()).hexdigest()[:8]
    with open(Path(os.environ["FD_LOG_DIR"]) / "engine.log", "a", encoding="utf-8") as log:
        log.write(f"INFO fastdeploy_pd_fix: abort of request stub-{digest} in slot 0 sent, emitted_end=None\n")


def log_orphan(request: dict, messagers_drop: bool) -> None:
    """What a prefill instance with the plugin logs for an orphan: the engine's notice, put before it admits the
    request (plugin/engine/patch.py), then each rank's messager dropping the orphan's layer-0 task of every chunk
    (adapters/messager_step.py, policy/release.py)."""
    prompt = str(request.get("prompt") or request.get("messages"))
    request_id = f"cmpl-stub-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}_0"
    need = max(1, len(prompt) // 4)
    log_dir = Path(os.environ["FD_LOG_DIR"])
    with LOG_LOCK:
        slot = next(ORPHAN_SLOTS)
        with open(log_dir / "engine.log", "a", encoding="utf-8") as log:
            log.write(
                f"INFO fastdeploy_pd_fix: engine notice put: orphan of request {request_id} on slot {slot} "
                f"(need_prefill_tokens={need})\n"
            )
        if not messagers_drop:
            return
        chunks = [(start, min(start + CHUNK_TOKENS, need)) for start in range(0, need, CHUNK_TOKENS)]
        for rank in range(RANKS):
            with open(log_dir / f"cache_messager_rank{rank}.log", "a", encoding="utf-8") as log:
                for start, end in chunks:
                    log.write(
                        f"WARNING fastdeploy_pd_fix: dropped layer-0 task slot={slot} prefilled_token_num={end} "
                        f"from kv signal: chunk [{start}, {end}) belongs to orphan {request_id}\n"
                    )


def register(args, port: int) -> None:
    if args.router:
        router = f"http://{args.router}"
    else:
        router = f"http://{HOST}:{Path(args.router_port_file).read_text().strip()}"
    if args.register_after_router_polls:
        http_json(f"{router}/wait_polls?count={args.register_after_router_polls}")
    status, body = http_json(f"{router}/register", {"role": args.role, "host_ip": HOST, "port": port})
    print(f"stub {args.role}: registered with {router}: {status} {body}", file=sys.stderr, flush=True)


def write_cache_messager_logs(kind: str) -> None:
    log_dir = Path(os.environ["FD_LOG_DIR"])
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank, batches in enumerate(BATCHES[kind]):
        lines = [f"stub cache messager rank {rank} started; active on rank_id={rank} rank={rank} nranks=2"]
        for number, (slot, offset, end) in enumerate(EARLY_SIGNALS[rank], start=1):
            lines.append(
                f"INFO fastdeploy_pd_fix: early layer-0 signal #{number}: slot {slot} chunk [{offset}, {end}) "
                "arrived before its registration"
            )
        for number, batch in enumerate(batches, start=1):
            digest = hashlib.blake2b(repr(batches[:number]).encode(), digest_size=4).hexdigest()
            lines.append(f"INFO fastdeploy_pd_fix: queued batch #{number} {batch} seq_hash={digest}")
        (log_dir / f"cache_messager_rank{rank}.log").write_text("\n".join(lines) + "\n")
        (log_dir / f"launch_cache_messager_{rank}.log").write_text(f"stub launch log of rank {rank}\n")


def hold_port_forever(pid_file: str) -> None:
    """The detached child: listen on a port, say which, wait to be killed."""
    server = make_server(JsonHandler)
    write_atomically(pid_file, f"{os.getpid()} {server.server_address[1]}")
    threading.Event().wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: any free port, announced in --port-file")
    parser.add_argument("--port-file")
    parser.add_argument("--role", default="mixed", choices=("mixed", "prefill", "decode"))
    parser.add_argument("--router", help="HOST:PORT of the router to register with")
    parser.add_argument("--router-port-file", help="the router's --port-file, for a router on any free port")
    parser.add_argument("--register-after-router-polls", type=int, default=0)
    parser.add_argument("--never-register", action="store_true")
    parser.add_argument("--never-answer", action="store_true")
    parser.add_argument("--exit-code", type=int)
    parser.add_argument("--answer-suffix", default="")
    parser.add_argument("--cache-messager-logs", choices=sorted(BATCHES))
    parser.add_argument("--detached-child-file")
    parser.add_argument("--abort-notices", action="store_true")
    parser.add_argument("--orphan-notices", action="store_true")
    parser.add_argument("--no-orphan-drops", action="store_true")
    parser.add_argument("--stream-hold-s", type=float, default=5.0)
    parser.add_argument("--hold-port", metavar="PID_FILE", help="run as the detached child")
    args = parser.parse_args()

    if args.hold_port:
        hold_port_forever(args.hold_port)
        return
    if args.exit_code is not None:
        print(f"stub {args.role}: failing start-up on purpose (exit code {args.exit_code})", flush=True)
        sys.exit(args.exit_code)
    if args.cache_messager_logs:
        write_cache_messager_logs(args.cache_messager_logs)
    if args.detached_child_file:
        command = [sys.executable, __file__, "--hold-port", args.detached_child_file]
        subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)
    server = make_server(make_handler(args), args.port)
    port = server.server_address[1]
    announce_port(server, args.port_file)
    if (args.router or args.router_port_file) and not args.never_register:
        threading.Thread(target=register, args=(args, port), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
