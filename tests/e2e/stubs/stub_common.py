"""Shared by the stub servers: JSON replies, serving on 127.0.0.1 and the port-file handshake."""

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class JsonHandler(BaseHTTPRequestHandler):
    """Request handler with JSON helpers; HTTP/1.0, one request per connection."""

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def reply(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def http_json(url: str, payload=None, timeout_s: float = 60.0):
    """GET or POST JSON; returns (status, decoded body)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def announce_port(server: ThreadingHTTPServer, port_file) -> None:
    """The start-up handshake: the port the server listens on, written to ``port_file`` (if any)."""
    if port_file:
        write_atomically(port_file, str(server.server_address[1]))


def write_atomically(path: str, text: str) -> None:
    """Write then rename, so that a reader never sees a partial file."""
    temporary = Path(f"{path}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def make_server(handler_class, port: int = 0) -> ThreadingHTTPServer:
    """Bound to ``port`` on 127.0.0.1 (0: any free port); request threads are daemons, so exit is never held up."""
    server = ThreadingHTTPServer((HOST, port), handler_class)
    server.daemon_threads = True
    return server
