"""A long-running tool stopped with SIGTERM or SIGINT leaves no engine or rank process and no temporary folder."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.upstream_files import TARGET_FILES, UPSTREAM

EXIT_WAIT_S = 60


def processes_in(folder: Path):
    """Pids of the processes whose working directory is inside ``folder`` (the rank processes run in their run's
    folder) or whose command line names it (the engine's record file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in command:
            found.append(int(entry.name))
    return found


#: A real upstream file preflight patches (test data), if there is one.
UPSTREAM_TARGET = next(iter(TARGET_FILES), None)
FIRST_PROGRESS_LINE = re.compile(r"^\[\s*1/\d+\]")
#: Each tool with a command line whose progress goes to stderr.
TOOLS = {
    "demo": [sys.executable, "-m", "fastdeploy_pd_fix", "demo"],
    "preflight": [sys.executable, "-m", "fastdeploy_pd_fix", "preflight", "--json", "--source", str(UPSTREAM_TARGET)],
}


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc to find the runs' processes")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_tool_cleans_up_on_a_signal(tmp_path, tool, signum):
    if tool == "preflight" and UPSTREAM_TARGET is None:
        pytest.skip(f"no real upstream CacheMessagerV1 file in {UPSTREAM.resolve()}")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(TOOLS[tool], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        # Handshake: the first progress line means runs are under way and the next ones have started.
        lines = []
        for line in process.stderr:
            lines.append(line)
            if FIRST_PROGRESS_LINE.match(line):
                break
        assert any(FIRST_PROGRESS_LINE.match(line) for line in lines), "".join(lines)
        # More runs are still to come or under way, each in a temporary folder from start to end.
        assert any(path.name.startswith("fd-") for path in tmp_path.iterdir()), "no run under way"
        process.send_signal(signum)
        code = process.wait(EXIT_WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + signum
    assert processes_in(tmp_path) == []
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith("fd-")] == []
