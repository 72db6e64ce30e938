"""``fastdeploy-pd-fix status`` where numpy does not import: one line on stderr saying so, exit 2, no traceback.

A process of its own: numpy is already imported in the test process, and the plugin's modules with it.
"""

import os
import subprocess
import sys


def test_status_without_numpy_says_what_is_missing_in_one_line(tmp_path):
    # What Python raises where numpy is not installed, from a package found before the real one.
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FD_PD_FIX")}
    completed = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix", "status"],
        env={**environment, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == "" and len(completed.stderr.splitlines()) == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("fastdeploy-pd-fix status: the plugin needs numpy, which does not import")
