"""Stub of FastDeploy's router for the harness tests (stdlib only, 127.0.0.1, any free port).

Endpoints: ``POST /register`` ({"role", "host_ip", "port"}), ``GET /registered_number``, ``GET /health``,
``POST /v1/completions`` and ``/v1/chat/completions`` (sent to the first prefill, then the first decode instance;
the decode answer is returned, as the real router does in splitwise mode; a streamed one is relayed from the prefill
instance, and closed there when its client closes). Like the real router, it adds ``disaggregate_info`` (naming the
two instances) to every request it forwards: a request without it is one sent straight to a server (an orphan on a
prefill instance). Test handshake: ``GET
/wait_polls?count=N`` answers once ``/registered_number`` has been answered N times.

Start-up handshake: with ``--port 0`` the port is written to ``--port-file`` once the server listens.
"""

import argparse
import json
import select
import socket
import threading
import urllib.parse

from stub_common import JsonHandler, announce_port, http_json, make_server

ROLES = ("mixed", "prefill", "decode")


class RouterState:
    def __init__(self):
        self.changed = threading.Condition()
        self.instances = {role: [] for role in ROLES}
        self.polls = 0


STATE = RouterState()


def address(instance: dict) -> str:
    return f"{instance['host_ip']}:{instance['port']}"


class RouterHandler(JsonHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/health":
            self.reply(200, {})
        elif url.path == "/registered_number":
            with STATE.changed:
                counts = {role: len(STATE.instances[role]) for role in ROLES}
                STATE.polls += 1
                STATE.changed.notify_all()
            self.reply(200, counts)
        elif url.path == "/wait_polls":
            count = int(urllib.parse.parse_qs(url.query)["count"][0])
            with STATE.changed:
                STATE.changed.wait_for(lambda: STATE.polls >= count, timeout=60)
                polls = STATE.polls
            self.reply(200, {"polls": polls})
        else:
            self.reply(404, {"error": self.path})

    def do_POST(self):
        if self.path == "/register":
            instance = self.read_json()
            if instance.get("role") not in ROLES:
                self.reply(400, {"error": f"invalid role {instance.get('role')!r}"})
                return
            with STATE.changed:
                STATE.instances[instance["role"]].append(instance)
                STATE.changed.notify_all()
            self.reply(200, {"status": "success"})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            self.forward(self.read_json())
        else:
            self.reply(404, {"error": self.path})

    def forward(self, request):
        with STATE.changed:
            prefill, decode = STATE.instances["prefill"][:1], STATE.instances["decode"][:1]
        if not (prefill and decode):
            self.reply(503, {"error": "no prefill or no decode instance registered"})
            return
        addresses = {"prefill": address(prefill[0]), "decode": address(decode[0])}
        request = {**request, "disaggregate_info": addresses}
        if request.get("stream"):
            self.relay_stream(prefill[0], request)
            return
        for instance in prefill + decode:
            status, body = http_json(f"http://{address(instance)}{self.path}", request)
        self.reply(status, body)

    def relay_stream(self, instance, request):
        """A streamed request goes to the prefill instance, its answer relayed byte by byte; when the client closes,
        so does the router (the real router's client disconnect reaching the servers)."""
        body = json.dumps(request).encode()
        head = f"POST {self.path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.close_connection = True
        with socket.create_connection((instance["host_ip"], instance["port"])) as upstream:
            upstream.sendall(head.encode() + body)
            ends = {self.connection: upstream, upstream: self.connection}
            while True:
                readable, _, _ = select.select(list(ends), [], [], 60)
                if not readable:
                    return
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    ends[source].sendall(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: any free port, announced in --port-file")
    parser.add_argument("--port-file")
    args = parser.parse_args()
    server = make_server(RouterHandler, args.port)
    announce_port(server, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
