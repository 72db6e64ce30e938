"""The .pth bootstrap, in fresh interpreters: script runs, imports, the off switch and the mode switch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastdeploy_pd_fix import _bootstrap

TARGET = textwrap.dedent(
    """
    import builtins, json, sys

    def get_output_kv_signal(buffer, rank_id, wait_flag):
        pass

    class CacheMessagerV1:
        def __init__(self):
            self.idx_cache_task_dict = {}

        def consume_signals(self):
            get_output_kv_signal(None, self.rank_id, 0)

        def _add_cache_task_thread(self):
            self.idx_cache_task_dict[0] = {}

    from fastdeploy_pd_fix import _bootstrap
    from fastdeploy_pd_fix.plugin.patching import patch_state
    print(json.dumps({
        "module": CacheMessagerV1.__module__,
        "patched": getattr(CacheMessagerV1.consume_signals, "__fd_pd_fix__", False),
        "mode": getattr(patch_state(CacheMessagerV1), "mode", None),
        "build_class_restored": builtins.__build_class__ is _bootstrap._original_build_class,
        "state": _bootstrap.state,
    }))
    """
)


@pytest.fixture(scope="module", autouse=True)
def plugin_installed():
    assert _bootstrap.state[
        "installed"
    ], "fastdeploy_pd_fix.pth did not run in this interpreter: install the plugin (pip install . or -e .) first"


def run_script(path, **env):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TARGET)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FD_PD_FIX")}
    completed = subprocess.run(
        [sys.executable, str(path)], env={**environment, **env}, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_script_run_cache_messager_is_patched_in_main(tmp_path):
    result, stderr = run_script(tmp_path / "fastdeploy" / "cache_manager" / "cache_messager.py")
    assert result["module"] == "__main__" and result["patched"] and result["mode"] == "ordered"
    assert result["build_class_restored"] and not result["state"]["script_hook"]
    assert "patched __main__.CacheMessagerV1 (mode=ordered" in stderr


def test_off_switch_leaves_the_original_and_says_so(tmp_path):
    result, stderr = run_script(tmp_path / "fastdeploy" / "cache_manager" / "cache_messager.py", FD_PD_FIX="0")
    assert not result["patched"] and result["state"]["disabled"]
    assert "disabled by FD_PD_FIX=0" in stderr


def test_mode_switch_and_bad_mode(tmp_path):
    script = tmp_path / "fastdeploy" / "cache_manager" / "cache_messager.py"
    assert run_script(script, FD_PD_FIX_MODE="upstream")[0]["mode"] == "upstream"
    result, stderr = run_script(script, FD_PD_FIX_MODE="fastest")
    assert (
        result["mode"] == "ordered" and "FD_PD_FIX_MODE='fastest' is not one of ordered, upstream, observe" in stderr
    )


def test_other_scripts_are_not_hooked(tmp_path):
    result, stderr = run_script(tmp_path / "other" / "cache_messager.py")
    assert not result["patched"] and not result["state"]["script_hook"] and stderr == ""


def test_is_cache_messager_script():
    assert _bootstrap.is_cache_messager_script(["/x/site-packages/fastdeploy/cache_manager/cache_messager.py"])
    assert not _bootstrap.is_cache_messager_script(["/x/fastdeploy/cache_manager/other.py"])
    assert not _bootstrap.is_cache_messager_script([])
