"""A long-running tool stopped by signals leaves no engine or rank process and no temporary folder: once, whatever
arrives while it stops (a second Ctrl-C used to deadlock it), with 128 + the first signal's number and one line."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.upstream_files import TARGET_FILES, UPSTREAM

from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.target import SCRIPT_PATH

EXIT_WAIT_S = 60
pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc to find the runs' processes")


def processes_in(folder: Path):
    """Pids of the processes whose working directory is inside ``folder`` (the rank processes run in their run's
    folder), whose command line names it (the engine's record file) or whose ``TMPDIR`` is it (everything the tool
    started, at any depth, inherits the ``TMPDIR`` the test gives the tool)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in command or f"TMPDIR={folder}".encode() in environ:
            found.append(int(entry.name))
    return found


#: A real upstream file preflight patches (test data), if there is one.
UPSTREAM_TARGET = next(iter(TARGET_FILES), None)
FIRST_PROGRESS_LINE = re.compile(r"^\[\s*1/\d+\]")
PROGRESS_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\] (.*)$")
#: Each tool with a command line whose progress goes to stderr.
TOOLS = {
    "demo": [sys.executable, "-m", "fastdeploy_pd_fix", "demo"],
    "preflight": [sys.executable, "-m", "fastdeploy_pd_fix", "preflight", "--json", "--patch-non-racing"]
    + ["--source", str(UPSTREAM_TARGET)],
}
#: The same, on a file that is always there (the stand-in's release file), for the repeated tests.
ALWAYS = {**TOOLS, "preflight": TOOLS["preflight"][:-1] + [str(STANDIN_ROOT / SCRIPT_PATH)]}
MIXED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_GAP_S = 0.2


def start_and_wait_for_runs(command, folder: Path):
    """Start ``command`` with ``TMPDIR=folder``; return once runs are under way (the handshake: the first progress
    line means a run ended and the next ones have started, each in a temporary folder from start to end)."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(folder)},
        text=True,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if FIRST_PROGRESS_LINE.match(line):
            break
    assert any(FIRST_PROGRESS_LINE.match(line) for line in lines), "".join(lines)
    assert any(path.name.startswith("fd-") for path in folder.iterdir()), "no run under way"
    return process, lines


def pending(pid: int, signum: int) -> bool:
    """``signum`` is still pending for the process (not yet taken by any of its threads)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = re.findall(r"^(?:ShdPnd|SigPnd):\s*([0-9a-f]+)$", status, re.MULTILINE)
    return any(int(mask, 16) >> (signum - 1) & 1 for mask in masks)


def interrupt(command, folder: Path, signals, gaps):
    """Run ``command`` until runs are under way, send ``signals`` (``gaps[i]`` seconds after signal ``i``), and
    return its exit code and its stderr. Signals sent microseconds apart may be taken in either order (the kernel
    hands out pending signals lowest number first), so the first is sent alone: the others only once a thread of
    the tool has taken it (a handshake on /proc, not a sleep); the gaps then start."""
    process, lines = start_and_wait_for_runs(command, folder)
    try:
        process.send_signal(signals[0])
        while pending(process.pid, signals[0]):
            time.sleep(0)
        for signum, gap in zip(signals[1:], gaps):
            time.sleep(gap)
            process.send_signal(signum)
        _, rest = process.communicate(timeout=EXIT_WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, "".join(lines) + rest


def check_interrupted(code, stderr: str, folder: Path, first: int, context: str) -> None:
    """128 + the first signal, one line naming it, every run reported (the unfinished ones "not run", never
    "error"), and nothing left: no process the tool started, no temporary folder."""
    assert code == 128 + first, f"{context}\n{stderr}"
    interrupted = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1 and f"interrupted by {signal.Signals(first).name}" in interrupted[0], context
    progress = [PROGRESS_LINE.match(line) for line in stderr.splitlines() if PROGRESS_LINE.match(line)]
    assert progress and progress[-1][1] == progress[-1][2], f"every run is reported: {context}\n{stderr}"
    assert not [match[0] for match in progress if "error" in match[3]], f"{context}\n{stderr}"
    assert any("not run" in match[3] for match in progress), f"{context}\n{stderr}"
    assert processes_in(folder) == [], context
    assert list(folder.iterdir()) == [], context


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_tool_cleans_up_on_a_signal(tmp_path, tool, signum):
    if tool == "preflight" and UPSTREAM_TARGET is None:
        pytest.skip(f"no real upstream CacheMessagerV1 file in {UPSTREAM.resolve()}")
    code, stderr = interrupt(TOOLS[tool], tmp_path, [signum], [])
    check_interrupted(code, stderr, tmp_path, signum, f"{tool} {signum!r}")


def repeated_interrupts(tmp_path, tool: str, attempts: int) -> None:
    """``attempts`` runs of ``tool``, each stopped by two or three signals (mixed) at random gaps up to
    :data:`MAX_GAP_S`; the seed is in every failure message (set ``TOOL_SIGNALS_SEED`` to replay it)."""
    seed = int(os.environ.get("TOOL_SIGNALS_SEED", random.randrange(2**32)))
    chooser = random.Random(seed)
    for attempt in range(attempts):
        signals = [chooser.choice(MIXED) for _ in range(chooser.choice((2, 3)))]
        gaps = [chooser.uniform(0, MAX_GAP_S) for _ in signals[1:]]
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        code, stderr = interrupt(ALWAYS[tool], folder, signals, gaps)
        context = (
            f"seed {seed}, attempt {attempt}: {[signal.Signals(n).name for n in signals]}, gaps "
            f"{[round(gap, 3) for gap in gaps]} s"
        )
        check_interrupted(code, stderr, folder, signals[0], context)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tool", ALWAYS)
def test_more_signals_while_stopping_change_nothing(tmp_path, tool):
    repeated_interrupts(tmp_path, tool, attempts=3)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("tool", ALWAYS)
def test_more_signals_while_stopping_change_nothing_50_in_a_row(tmp_path, tool):
    repeated_interrupts(tmp_path, tool, attempts=50)
