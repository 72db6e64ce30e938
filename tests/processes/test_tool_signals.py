"""A long-running tool stopped with SIGTERM or SIGINT leaves no engine or rank process and no temporary folder."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc to find the runs' processes")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_demo_cleans_up_on_a_signal(tmp_path, signum):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "fastdeploy_pd_fix", "demo"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        # Handshake: the first progress line means runs are under way and the next ones have started.
        lines = []
        for line in demo.stderr:
            lines.append(line)
            if line.startswith("[1/"):
                break
        assert any(line.startswith("[1/") for line in lines), "".join(lines)
        # Eleven runs are still to come or under way, each in its own temporary folder from start to end.
        assert any(path.name.startswith("fd-standin-") for path in tmp_path.iterdir()), "no run under way"
        demo.send_signal(signum)
        code = demo.wait(EXIT_WAIT_S)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert code == 128 + signum
    assert processes_in(tmp_path) == []
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith("fd-standin-")] == []
