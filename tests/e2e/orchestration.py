"""Start, watch and stop the servers of an end-to-end run; standard library only.

A :class:`Deployment` is a list of :class:`ServerSpec` started in order, each as a subprocess in its own session
(process group), then a readiness check (router registration or ``/health``). :meth:`Deployment.run_workload` sends
concurrent requests under one deadline; a hang or a failed request raises a :class:`WorkloadFailure` whose message
carries the cache messager logs of every rank and the verdict of ``fastdeploy-pd-fix diagnose``, with all logs
copied to the deployment's artifacts directory. :meth:`Deployment.teardown` always stops everything: SIGTERM to each
process group and to every descendant seen (FastDeploy starts its cache messagers in sessions of their own, out of
reach of ``killpg``), SIGKILL after a grace period, then a check that every port is free again.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

LOOPBACK = "127.0.0.1"
ROLES = ("mixed", "prefill", "decode")
# Every naming scheme of the releases (rank_id, device, tprank launch logs), as `diagnose` reads them.
CACHE_MESSAGER_LOG_PATTERNS = ("cache_messager_*.log", "launch_cache_messager_*.log", "cache_messager.log")
KILL_WAIT_S = 10.0
POLL_S = 0.02
LOG_TAIL_LINES = 40
HTTP_ERRORS = (OSError, ValueError, http.client.HTTPException)

# Requests go to loopback servers only: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """A server exited during start-up, or did not announce itself in time."""


class ReadinessTimeout(ServerStartError):
    """The bounded readiness polls ran out."""


class PortsBusy(RuntimeError):
    """A port that must be free is in use."""


class TeardownError(RuntimeError):
    """A process survived SIGKILL, or a port stayed busy after the teardown."""


class WorkloadFailure(AssertionError):
    """The workload missed its pass criteria."""


class RequestsHung(WorkloadFailure):
    """Requests did not complete within the deadline."""


class RequestsFailed(WorkloadFailure):
    """Requests completed with an error or an unusable answer."""


class OutputMismatch(WorkloadFailure):
    """Outputs differ from the reference outputs."""


# --- ports -----------------------------------------------------------------------------------------------------


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when no socket holds ``port``: a bind with SO_REUSEADDR succeeds (connections in TIME_WAIT do not count,
    a listener on 0.0.0.0 does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def busy_ports(ports: Sequence[int], host: str = LOOPBACK) -> List[int]:
    return [port for port in ports if not port_is_free(port, host)]


# The states of /proc/net/tcp by number (include/net/tcp_states.h).
TCP_STATES = "? ESTABLISHED SYN_SENT SYN_RECV FIN_WAIT1 FIN_WAIT2 TIME_WAIT CLOSE CLOSE_WAIT LAST_ACK LISTEN".split()


def port_holders(port: int) -> List[str]:
    """What holds local ``port`` (Linux /proc): one line per socket, with its TCP state, its peer and the processes
    that have it open, so that a busy port names its culprit ("ESTABLISHED to port 8700 in pid 12 (python)")."""
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port:
                number = int(state, 16)
                name = TCP_STATES[number] if number < len(TCP_STATES) else state
                peer = "" if name == "LISTEN" else f" to port {int(remote.rsplit(':', 1)[1], 16)}"
                sockets.append((f"{name}{peer}", inode))
    owners: Dict[str, List[str]] = {inode: [] for _, inode in sockets if inode != "0"}
    for fd_dir in Path("/proc").glob("[0-9]*/fd") if owners else ():
        try:
            fds = list(fd_dir.iterdir())
            command = (fd_dir.parent / "comm").read_text().strip()
        except OSError:
            continue
        links = set()
        for fd in fds:
            try:
                links.add(os.readlink(fd))
            except OSError:  # closed meanwhile (the listing's own descriptor, for one)
                pass
        for inode in owners:
            if f"socket:[{inode}]" in links:
                owners[inode].append(f"pid {fd_dir.parent.name} ({command})")
    return [
        f"{state} in {', '.join(owners.get(inode) or ['no process (kept by the kernel)'])}" for state, inode in sockets
    ]


def wait_until_ports_free(ports: Sequence[int], host: str, timeout_s: float) -> List[int]:
    """Poll until every port is free; returns the ports still busy at the timeout (empty: all free)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = busy_ports(ports, host)
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(POLL_S)


# --- processes (Linux /proc) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid plus its start time (clock ticks after boot), so that a reused pid is never mistaken for it."""

    pid: int
    start_time: int


def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, ...), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may itself contain spaces or parentheses.
    return text[text.rindex(")") + 2 :].split()


def identify(pid: int) -> Optional[ProcessIdentity]:
    fields = _stat_fields(pid)
    return ProcessIdentity(pid, int(fields[19])) if fields else None


def is_running(process: ProcessIdentity) -> bool:
    """Alive and not a zombie, and still the same process."""
    fields = _stat_fields(process.pid)
    return bool(fields) and fields[0] not in ("Z", "X") and int(fields[19]) == process.start_time


def process_group_of(process: ProcessIdentity) -> Optional[int]:
    fields = _stat_fields(process.pid)
    return int(fields[2]) if fields and int(fields[19]) == process.start_time else None


def descendants(root_pid: int) -> List[ProcessIdentity]:
    """Every live descendant of ``root_pid``, whatever session it started for itself ([] without /proc)."""
    children: Dict[int, List[ProcessIdentity]] = {}
    try:
        entries = [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        fields = _stat_fields(int(name))
        if fields:
            children.setdefault(int(fields[1]), []).append(ProcessIdentity(int(name), int(fields[19])))
    found, frontier = [], [root_pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child.pid)
    return found


@dataclass
class ServerSpec:
    """How to start one server. ``ports[0]``, when present, is its HTTP port.

    ``port_file``: start-up handshake for servers that bind port 0; the server writes its port there and
    :meth:`ServerProcess.start` waits for it, then appends the port to ``ports``. ``startup_check`` (e.g.
    :class:`WaitForHealth`): :meth:`Deployment.start` waits for it before starting the next server (a router must
    answer before the servers that register with it start).
    """

    name: str
    argv: List[str]
    env: Dict[str, str]
    log_path: Path
    ports: List[int] = field(default_factory=list)
    log_dirs: List[Path] = field(default_factory=list)
    cwd: Optional[Path] = None
    port_file: Optional[Path] = None
    announce_timeout_s: float = 10.0
    startup_check: Optional["WaitForHealth"] = None
    stop_grace_s: float = 10.0


class ServerProcess:
    """One started server: its process group, the descendants seen so far, its output log."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.popen: Optional[subprocess.Popen] = None
        self.known_descendants: set = set()
        self.stopped = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def start(self) -> None:
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        for directory in spec.log_dirs + ([spec.cwd] if spec.cwd else []):
            directory.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches it and its children
            )
        if spec.port_file is not None:
            spec.ports.append(int(self.wait_for_file(spec.port_file, spec.announce_timeout_s)))

    def exit_code(self) -> Optional[int]:
        return self.popen.poll() if self.popen else None

    def remember_descendants(self) -> None:
        """Record the process tree now, so that children reparented later (their parent died) are still stopped."""
        if self.popen is not None:
            self.known_descendants.update(descendants(self.popen.pid))

    def wait_for_file(self, path: Path, timeout_s: float) -> str:
        """The content of ``path`` once it exists (written atomically by the server); fails if the server exits."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            code = self.exit_code()
            if code is not None:
                raise ServerStartError(f"{self.name} exited with code {code} during start-up\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise ServerStartError(f"{self.name} did not write {path} within {timeout_s} s\n{self.log_tail()}")
            time.sleep(POLL_S)
        return path.read_text().strip()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return f"--- {self.spec.log_path} (last {lines} lines) ---\n{tail(self.spec.log_path, lines)}"

    def stop(self) -> List[str]:
        """Stop the server and every descendant; returns problems (empty when all is gone)."""
        if self.popen is None or self.stopped:
            return []
        self.stopped = True
        self.remember_descendants()
        for sig, wait_s in ((signal.SIGTERM, self.spec.stop_grace_s), (signal.SIGKILL, KILL_WAIT_S)):
            if self._everything_exited():
                break
            self._send(sig)
            self._wait_for_exit(wait_s)
        problems = [f"{self.name}: descendant pid {process.pid} survived SIGKILL" for process in self._survivors()]
        if self.popen.poll() is None:
            problems.append(f"{self.name}: pid {self.popen.pid} survived SIGKILL")
        return problems

    def _survivors(self) -> List[ProcessIdentity]:
        return [process for process in self.known_descendants if is_running(process)]

    def _everything_exited(self) -> bool:
        return self.popen.poll() is not None and not self._survivors()

    def _send(self, sig: int) -> None:
        survivors = self._survivors()
        groups = {self.popen.pid} | {process_group_of(process) for process in survivors}
        for group in groups - {None, 0, 1, os.getpgrp()}:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for process in survivors:
            if is_running(process):
                try:
                    os.kill(process.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _wait_for_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._everything_exited() and time.monotonic() < deadline:
            time.sleep(POLL_S)


class Cluster:
    """Servers of one run: started in order, stopped in reverse order, all of them, whatever happens."""

    def __init__(self, name: str, host: str = LOOPBACK, port_free_timeout_s: float = 30.0):
        self.name = name
        self.host = host
        self.port_free_timeout_s = port_free_timeout_s
        self.servers: List[ServerProcess] = []
        self.torn_down = False

    def start(self, spec: ServerSpec) -> ServerProcess:
        busy = busy_ports(spec.ports, self.host)
        if busy:
            holders = "; ".join(f"{port}: {', '.join(port_holders(port))}" for port in busy)
            raise PortsBusy(
                f"{spec.name}: port(s) {busy} already in use on {self.host} ({holders}); stop what holds them or "
                "choose other ports (FD_E2E_PORT_BASE, FD_E2E_ROUTER_PORT)"
            )
        server = ServerProcess(spec)
        self.servers.append(server)
        server.start()
        return server

    def server(self, name: str) -> ServerProcess:
        return next(server for server in self.servers if server.name == name)

    def raise_if_exited(self) -> None:
        """Fail fast when a server died (and note the process trees while they are intact)."""
        for server in self.servers:
            server.remember_descendants()
            code = server.exit_code()
            if code is not None:
                raise ServerStartError(f"{server.name} exited with code {code}\n{server.log_tail()}")

    def ports(self) -> List[int]:
        return [port for server in self.servers for port in server.spec.ports]

    def teardown(self) -> None:
        """Stop every server (last started first), then check that all their ports are free again."""
        if self.torn_down:
            return
        self.torn_down = True
        problems: List[str] = []
        for server in reversed(self.servers):
            problems += server.stop()
        still_busy = wait_until_ports_free(self.ports(), self.host, self.port_free_timeout_s)
        if still_busy:
            holders = "; ".join(f"{port}: {', '.join(port_holders(port)) or 'no socket left'}" for port in still_busy)
            problems.append(
                f"port(s) {still_busy} still in use {self.port_free_timeout_s} s after the teardown ({holders})"
            )
        if problems:
            raise TeardownError(f"teardown of {self.name}: " + "; ".join(problems))

    def collect_logs(self, destination: Path) -> List[str]:
        """Copy each server's output log and log directories to ``destination/<server>/``; returns problems."""
        problems = []
        for server in self.servers:
            target = destination / server.name
            target.mkdir(parents=True, exist_ok=True)
            sources = [server.spec.log_path] + server.spec.log_dirs
            for source in sources:
                try:
                    if source.is_dir():
                        shutil.copytree(source, target / source.name, dirs_exist_ok=True)
                    elif source.exists():
                        shutil.copy2(source, target / source.name)
                except (OSError, shutil.Error) as error:
                    problems.append(f"copying {source}: {error}")
        return problems


# --- HTTP ------------------------------------------------------------------------------------------------------


def _decode(raw: bytes):
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def http_request(url: str, payload: Optional[dict] = None, timeout_s: float = 10.0) -> Tuple[int, object]:
    """GET (no payload) or POST JSON; returns the status and the decoded JSON body (or text). Raises on no answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return response.status, _decode(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _decode(error.read())


def registered_number(router_url: str, timeout_s: float = 5.0) -> Dict[str, int]:
    """The router's ``/registered_number`` per role; zeros while the router does not answer."""
    try:
        status, body = http_request(f"{router_url}/registered_number", timeout_s=timeout_s)
    except HTTP_ERRORS:
        return dict.fromkeys(ROLES, 0)
    if status != 200 or not isinstance(body, dict):
        return dict.fromkeys(ROLES, 0)
    return {role: int(body.get(role) or 0) for role in ROLES}


@dataclass(frozen=True)
class WaitForRegistration:
    """Ready when the router at the entry server counts at least ``required[role]`` instances of each role."""

    required: Mapping[str, int]
    attempts: int
    interval_s: float

    def wait(self, base_url: str, cluster: Optional[Cluster] = None) -> int:
        """Polls used; raises :class:`ReadinessTimeout` after ``attempts`` polls, or at once if a server exits."""
        counts: Dict[str, int] = {}
        for attempt in range(1, self.attempts + 1):
            if cluster is not None:
                cluster.raise_if_exited()
            counts = registered_number(base_url)
            if all(counts.get(role, 0) >= number for role, number in self.required.items()):
                return attempt
            if attempt < self.attempts:
                time.sleep(self.interval_s)
        raise ReadinessTimeout(
            f"router {base_url} still counts {counts} after {self.attempts} polls {self.interval_s} s apart "
            f"(needs {dict(self.required)})" + _tails(cluster)
        )


@dataclass(frozen=True)
class WaitForHealth:
    """Ready when ``GET {base_url}{path}`` answers 200."""

    attempts: int
    interval_s: float
    path: str = "/health"

    def wait(self, base_url: str, cluster: Optional[Cluster] = None) -> int:
        last = "no answer"
        for attempt in range(1, self.attempts + 1):
            if cluster is not None:
                cluster.raise_if_exited()
            try:
                status, _ = http_request(f"{base_url}{self.path}", timeout_s=5.0)
                if status == 200:
                    return attempt
                last = f"HTTP {status}"
            except HTTP_ERRORS as error:
                last = repr(error)
            if attempt < self.attempts:
                time.sleep(self.interval_s)
        raise ReadinessTimeout(
            f"{base_url}{self.path}: {last} after {self.attempts} polls {self.interval_s} s apart" + _tails(cluster)
        )


def _tails(cluster: Optional[Cluster]) -> str:
    return "".join(f"\n{server.log_tail()}" for server in cluster.servers) if cluster else ""


# --- workload --------------------------------------------------------------------------------------------------


@dataclass
class RequestOutcome:
    """What became of one request; ``finished`` is False for a request still waiting at the deadline."""

    index: int
    finished: bool = False
    status: Optional[int] = None
    text: Optional[str] = None
    error: Optional[str] = None
    seconds: Optional[float] = None
    url: str = ""

    @property
    def ok(self) -> bool:
        return self.finished and self.status == 200 and self.text is not None

    def describe(self) -> str:
        name = f"request {self.index}" + (f" to {self.url}" if self.url else "")
        if not self.finished:
            return f"{name}: no answer"
        if self.ok:
            return f"{name}: ok in {self.seconds:.1f} s"
        return f"{name}: {self.error} after {self.seconds:.1f} s"


def completion_text(body) -> str:
    """The generated text of an OpenAI-compatible completion or chat completion answer."""
    choice = body["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    if not isinstance(text, str):
        raise ValueError(f"no text in {choice!r}")
    return text


UNANSWERED_GRACE_S = 30.0


def send_concurrently(url: str, payloads: Sequence[dict], deadline_s: float) -> List[RequestOutcome]:
    """POST every payload to ``url`` at once, one thread each, and wait until all answered or ``deadline_s``
    passed."""
    return send_each_concurrently([url] * len(payloads), payloads, deadline_s)


def send_each_concurrently(urls: Sequence[str], payloads: Sequence[dict], deadline_s: float) -> List[RequestOutcome]:
    """POST ``payloads[i]`` to ``urls[i]``, all at once, one thread each, and wait until all answered or
    ``deadline_s`` passed. Outcomes name their URL when the URLs differ."""
    if len(urls) != len(payloads):
        raise ValueError(f"{len(urls)} URLs for {len(payloads)} payloads")
    labelled = len(set(urls)) > 1
    outcomes = [RequestOutcome(index, url=url if labelled else "") for index, url in enumerate(urls)]
    lock = threading.Lock()
    start_together = threading.Barrier(len(payloads) + 1)

    def send(index: int, payload: dict) -> None:
        start_together.wait()
        began = time.monotonic()
        status, text, error = None, None, None
        try:
            # The socket may wait longer than the deadline: a request unanswered at the deadline is a hang, never
            # an error, whichever of the two clocks would have fired first.
            status, body = http_request(urls[index], payload, timeout_s=deadline_s + UNANSWERED_GRACE_S)
        except socket.timeout:
            return  # unanswered: stays unfinished, reported by check_completed as hung
        except Exception as problem:  # any other way of not getting an answer is this request's outcome
            error = repr(problem)
        else:
            if status != 200:
                error = f"HTTP {status}: {str(body)[:300]}"
            else:
                try:
                    text = completion_text(body)
                except Exception as problem:
                    error = f"unusable answer {str(body)[:300]} ({problem!r})"
        with lock:
            outcomes[index] = dataclasses.replace(
                outcomes[index], finished=True, status=status, text=text, error=error, seconds=time.monotonic() - began
            )

    threads = [
        threading.Thread(target=send, args=(index, payload), name=f"e2e-request-{index}", daemon=True)
        for index, payload in enumerate(payloads)
    ]
    for thread in threads:
        thread.start()
    start_together.wait()
    deadline = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return [dataclasses.replace(outcome) for outcome in outcomes]


def check_completed(outcomes: Sequence[RequestOutcome], deadline_s: float) -> None:
    """Raise :class:`RequestsHung` if any request is unanswered, :class:`RequestsFailed` if any failed."""
    hung = [outcome for outcome in outcomes if not outcome.finished]
    failed = [outcome for outcome in outcomes if outcome.finished and not outcome.ok]
    summary = "\n".join(f"  {outcome.describe()}" for outcome in outcomes)
    if hung:
        raise RequestsHung(
            f"{len(hung)} of {len(outcomes)} requests did not complete within {deadline_s} s:\n{summary}"
        )
    if failed:
        raise RequestsFailed(f"{len(failed)} of {len(outcomes)} requests failed:\n{summary}")


def check_outputs_equal(actual: Sequence[str], expected: Sequence[str], max_mismatches: int = 0) -> None:
    """Raise :class:`OutputMismatch` when more than ``max_mismatches`` outputs differ from the reference."""
    if len(actual) != len(expected):
        raise OutputMismatch(f"{len(actual)} outputs, {len(expected)} reference outputs")
    differing = [index for index, (got, want) in enumerate(zip(actual, expected)) if got != want]
    if len(differing) <= max_mismatches:
        return
    lines = [f"{len(differing)} of {len(actual)} outputs differ from the reference (allowed: {max_mismatches}):"]
    for index in differing[:5]:
        common = len(os.path.commonprefix([actual[index], expected[index]]))
        lines.append(f"  prompt {index}: equal for {common} characters")
        lines.append(f"    got:       {actual[index]!r}")
        lines.append(f"    reference: {expected[index]!r}")
    raise OutputMismatch("\n".join(lines))


# --- abort wave ------------------------------------------------------------------------------------------------


@dataclass
class ClosedStream:
    """One streamed request the client closed: whether the server had answered (status line) and whether a token
    (an SSE ``data:`` event) had arrived before the close (then the close came after the prefill)."""

    index: int
    answered: bool = False
    token_before_close: bool = False
    error: Optional[str] = None


def close_streams_early(url: str, payloads: Sequence[dict], abort_after_s: float) -> List[ClosedStream]:
    """POST every (streamed) payload at once and close each connection as soon as the server starts answering, or
    after ``abort_after_s`` without an answer: the client disconnect that aborts a request mid-prefill."""
    parsed = urllib.parse.urlsplit(url)
    outcomes = [ClosedStream(index) for index in range(len(payloads))]
    start_together = threading.Barrier(len(payloads) + 1)

    def send_and_close(index: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        head = (
            f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        start_together.wait()
        try:
            with socket.create_connection((parsed.hostname, parsed.port), timeout=abort_after_s + 10) as sock:
                sock.sendall(head + body)
                readable, _, _ = select.select([sock], [], [], abort_after_s)
                received = sock.recv(65536) if readable else b""
                outcomes[index].answered = received.startswith(b"HTTP/")
                outcomes[index].token_before_close = b"data:" in received
        except OSError as error:
            outcomes[index].error = repr(error)

    threads = [
        threading.Thread(target=send_and_close, args=(index, payload), name=f"e2e-abort-{index}", daemon=True)
        for index, payload in enumerate(payloads)
    ]
    for thread in threads:
        thread.start()
    start_together.wait()
    for thread in threads:
        thread.join(abort_after_s + 30)
    return outcomes


def describe_closed_streams(closed: Sequence[ClosedStream]) -> str:
    answered = sum(stream.answered for stream in closed)
    late = sum(stream.token_before_close for stream in closed)
    errors = [f"stream {stream.index}: {stream.error}" for stream in closed if stream.error]
    return (
        f"{len(closed)} streams closed: {answered} after the server answered, {len(closed) - answered} before; "
        f"{late} had already received a token (closed after their prefill)" + "".join(f"\n  {e}" for e in errors)
    )


# --- logs and failure reports ----------------------------------------------------------------------------------

#: The messager's per-rank log names (as ``diagnose`` reads them), with the number they carry.
RANK_LOG_NAME = re.compile(r"^cache_messager_(?:rank|device)?(?P<number>\d+)\.log$")
#: The plugin's activation line in a messager log: which tensor-parallel rank wrote it.
ACTIVE_RANK = re.compile(r"active on rank_id=(?P<rank_id>\d+)(?:.*?\brank=(?P<rank>\d+))?")
#: The messager's race counter (adapters/messager_step.py): a layer-0 task whose slot had no registration yet.
EARLY_SIGNAL = re.compile(
    r"early layer-0 signal #(?P<number>\d+): slot \d+ chunk \[\d+, \d+\) arrived before its registration"
)
#: The engine-side notice of an abort (plugin/engine/patch.py), in the prefill engine's logs.
ABORT_NOTICE = re.compile(r"abort of request .*emitted_end=")
#: The engine-side notice of an orphan (plugin/engine/patch.py, policy/notice.py): a request admitted by
#: ``add_request_in_p`` without ``disaggregate_info``, computed without a transfer.
ORPHAN_NOTICE = re.compile(
    r"engine notice put: orphan of request (?P<request_id>\S+) on slot (?P<slot>\d+) "
    r"\(need_prefill_tokens=(?P<need>\d+)\)"
)
#: A messager dropping an orphan's layer-0 task (adapters/messager_step.py, with the reason of policy/release.py).
ORPHAN_DROP = re.compile(
    r"dropped layer-0 task slot=\d+ prefilled_token_num=\d+ from [^:]*: chunk \[\d+, \d+\) belongs to orphan "
    r"(?P<request_id>\S+)"
)


def rank_logs(root: Path) -> List[Tuple[int, List[str]]]:
    """Each per-rank messager log under ``root`` (by name, as ``diagnose`` reads them) with its tensor-parallel rank
    and its lines. The rank is the one the log's last activation line names, else the number of its name."""
    found = []
    for path in sorted(root.rglob("cache_messager_*.log")):
        name = RANK_LOG_NAME.match(path.name)
        if name is None:
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        rank = int(name["number"])
        for active in filter(None, map(ACTIVE_RANK.search, lines)):
            rank = int(active["rank"] if active["rank"] is not None else active["rank_id"])
        found.append((rank, lines))
    return found


def early_signal_counts(root: Path) -> Dict[int, int]:
    """Per tensor-parallel rank of the messager logs under ``root``: how many layer-0 signals arrived before their
    registration (the highest ``#N`` its messager logged; 0 for a rank that logged none)."""
    counts: Dict[int, int] = {}
    for rank, lines in rank_logs(root):
        numbers = [int(early["number"]) for early in map(EARLY_SIGNAL.search, lines) if early]
        counts[rank] = max([counts.get(rank, 0)] + numbers)
    return counts


def orphan_drop_counts(root: Path) -> Dict[int, Dict[str, int]]:
    """Per tensor-parallel rank of the messager logs under ``root`` (every rank, also one that dropped nothing):
    how many layer-0 tasks of each orphan (by request id) its messager dropped."""
    counts: Dict[int, Dict[str, int]] = {}
    for rank, lines in rank_logs(root):
        dropped = counts.setdefault(rank, {})
        for drop in filter(None, map(ORPHAN_DROP.search, lines)):
            dropped[drop["request_id"]] = dropped.get(drop["request_id"], 0) + 1
    return counts


def engine_log_lines(root: Path, pattern: re.Pattern) -> List[str]:
    """Every line matching ``pattern`` in the logs under ``root`` that are not cache messager logs (those come from
    the engine), as ``file: line``."""
    messager_logs = set(cache_messager_logs(root))
    found = []
    for path in sorted(candidate for candidate in root.rglob("*") if candidate.is_file()):
        if path in messager_logs:
            continue
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        found += [f"{path.relative_to(root)}: {line.strip()}" for line in lines if pattern.search(line)]
    return found


def engine_abort_notices(root: Path) -> List[str]:
    """Every engine-side abort notice line (``abort of request ... emitted_end=``) of the logs under ``root``."""
    return engine_log_lines(root, ABORT_NOTICE)


def engine_orphan_notices(root: Path) -> List[str]:
    """Every engine-side orphan notice line (``engine notice put: orphan of request ...``) of the logs under
    ``root``."""
    return engine_log_lines(root, ORPHAN_NOTICE)


def noticed_orphans(notices: Sequence[str]) -> List[str]:
    """The request ids the orphan notice lines ``notices`` name, each once, in order of appearance."""
    ids = [notice["request_id"] for notice in map(ORPHAN_NOTICE.search, notices) if notice]
    return list(dict.fromkeys(ids))


def tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            data = handle.read()
    except OSError as error:
        return f"(unreadable: {error})"
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def cache_messager_logs(root: Path) -> List[Path]:
    found = {path for pattern in CACHE_MESSAGER_LOG_PATTERNS for path in root.rglob(pattern)}
    return sorted(found)


def run_diagnose(log_dir: Path, timeout_s: float = 120.0) -> Tuple[Optional[int], str]:
    """``fastdeploy-pd-fix diagnose log_dir`` with this interpreter: exit code (None if it did not run), output."""
    argv = [sys.executable, "-m", "fastdeploy_pd_fix", "diagnose", str(log_dir)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, repr(error)
    return result.returncode, (result.stdout + result.stderr).strip()


class Deployment:
    """Servers started in order, a readiness check on the entry server, a workload, and a teardown that always runs.

    ``entry`` names the server that takes the requests (its ``ports[0]``); ``diagnose_server`` the one whose cache
    messager logs ``fastdeploy-pd-fix diagnose`` reads (the prefill server: decode servers have messagers too, with
    the same log names).
    """

    def __init__(
        self,
        label: str,
        specs: Sequence[ServerSpec],
        entry: str,
        readiness,
        artifacts_dir: Path,
        diagnose_server: Optional[str] = None,
        host: str = LOOPBACK,
        port_free_timeout_s: float = 30.0,
    ):
        self.label = label
        self.specs = list(specs)
        self.entry = entry
        self.readiness = readiness
        self.artifacts_dir = artifacts_dir
        self.diagnose_server = diagnose_server
        self.host = host
        self.cluster = Cluster(label, host, port_free_timeout_s)
        self.readiness_polls: Optional[int] = None
        self.torn_down = False

    @property
    def base_url(self) -> str:
        return self.server_url(self.entry)

    def server_url(self, name: str) -> str:
        """The HTTP address of server ``name`` (its ``ports[0]``)."""
        return f"http://{self.host}:{self.cluster.server(name).spec.ports[0]}"

    def start(self) -> None:
        for spec in self.specs:
            self.cluster.start(spec)
            if spec.startup_check is not None:
                spec.startup_check.wait(f"http://{self.host}:{spec.ports[0]}", self.cluster)
        self.readiness_polls = self.readiness.wait(self.base_url, self.cluster)

    def run_workload(
        self,
        payloads: Sequence[dict],
        deadline_s: float,
        path: str = "/v1/completions",
        servers: Optional[Sequence[str]] = None,
    ) -> List[str]:
        """The texts of all answers, all requests sent at once; on a hang or a failure raises with the full report.
        ``servers``: the server each payload goes to, by name (default: every one to the entry server)."""
        servers = [self.entry] * len(payloads) if servers is None else servers
        for server in self.cluster.servers:
            server.remember_descendants()  # the engines' full process trees, for the teardown
        urls = [f"{self.server_url(name)}{path}" for name in servers]
        outcomes = send_each_concurrently(urls, payloads, deadline_s)
        try:
            check_completed(outcomes, deadline_s)
        except WorkloadFailure as failure:
            raise type(failure)(f"{self.label}: {failure}\n\n{self.failure_report()}") from None
        return [outcome.text for outcome in outcomes]

    def close_streams_early(self, payloads: Sequence[dict], abort_after_s: float, path: str = "/v1/completions"):
        """The abort wave: :func:`close_streams_early` on the entry server."""
        for server in self.cluster.servers:
            server.remember_descendants()
        return close_streams_early(f"{self.base_url}{path}", payloads, abort_after_s)

    def collect_logs(self) -> List[str]:
        return self.cluster.collect_logs(self.artifacts_dir)

    def server_artifacts(self, name: str) -> Path:
        """The copied logs of server ``name`` (copied now)."""
        self.collect_logs()
        return self.artifacts_dir / name

    def diagnose(self) -> Tuple[Optional[int], str]:
        """Copy the logs now and run ``fastdeploy-pd-fix diagnose`` on the copy of the ``diagnose_server``'s logs."""
        self.collect_logs()
        return run_diagnose(self.artifacts_dir / (self.diagnose_server or ""))

    def failure_report(self) -> str:
        """Logs copied to the artifacts directory, diagnose's verdict, and the tail of every cache messager log."""
        problems = self.collect_logs()
        lines = [f"logs of every server copied to {self.artifacts_dir}"] + [f"  ({problem})" for problem in problems]
        if self.diagnose_server is not None:
            code, output = run_diagnose(self.artifacts_dir / self.diagnose_server)
            lines += [f"fastdeploy-pd-fix diagnose {self.artifacts_dir / self.diagnose_server}: exit code {code}"]
            lines += [f"  {line}" for line in output.splitlines()]
        messager_logs = cache_messager_logs(self.artifacts_dir)
        if not messager_logs:
            lines.append("no cache messager log found (did the prefill server get as far as starting them?)")
        for path in messager_logs:
            lines.append(f"--- {path.relative_to(self.artifacts_dir)} (last {LOG_TAIL_LINES} lines) ---")
            lines.append(tail(path))
        return "\n".join(lines)

    def teardown(self) -> None:
        """Stop everything and check the ports (:class:`TeardownError` on a problem), then copy the final logs."""
        if self.torn_down:
            return
        self.torn_down = True
        try:
            self.cluster.teardown()
        finally:
            self.collect_logs()
