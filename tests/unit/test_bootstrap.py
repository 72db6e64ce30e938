"""The .pth bootstrap, in fresh interpreters: script runs, imports, the off switch and the mode switch, the guarded
.pth line of a half-removed install."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.installed import require_plugin_installed

from fastdeploy_pd_fix import bootstrap

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

    from fastdeploy_pd_fix import bootstrap
    from fastdeploy_pd_fix.plugin.messager.patch import patch_state
    print(json.dumps({
        "module": CacheMessagerV1.__module__,
        "patched": getattr(CacheMessagerV1.consume_signals, "__fd_pd_fix__", False),
        "mode": getattr(patch_state(CacheMessagerV1), "mode", None),
        "build_class_restored": builtins.__build_class__ is bootstrap._original_build_class,
        "state": bootstrap.state,
    }))
    """
)


@pytest.fixture(scope="module", autouse=True)
def plugin_installed():
    require_plugin_installed()


REPO = Path(__file__).resolve().parents[2]
IMPORTER = textwrap.dedent(
    """
    import importlib, inspect, json, sys
    from fastdeploy_pd_fix import bootstrap
    from fastdeploy_pd_fix.plugin.messager.patch import patch_state
    module = importlib.import_module("fastdeploy.cache_manager.cache_messager")
    patched = getattr(module.CacheMessagerV1.consume_signals, "__fd_pd_fix__", False)
    reloaded = importlib.reload(module)
    print(json.dumps({
        "module": module.CacheMessagerV1.__module__,
        "patched": patched,
        "patched_after_reload": getattr(reloaded.CacheMessagerV1.consume_signals, "__fd_pd_fix__", False),
        "mode": getattr(patch_state(module.CacheMessagerV1), "mode", None),
        "loader": type(module.__loader__).__name__,
        "spec_loader": type(module.__spec__.loader).__name__,
        "source_found": "def _add_cache_task_thread" in inspect.getsource(module),
        "wrapt": "wrapt" in sys.modules,
        "state": bootstrap.state,
    }))
    """
)


def clean_environment(**env):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FD_PD_FIX")}
    return {**environment, **env}


def run_script(path, **env):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TARGET)
    completed = subprocess.run(
        [sys.executable, str(path)], env=clean_environment(**env), capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def fake_fastdeploy(root):
    """A ``fastdeploy`` package whose cache_messager module defines the target class (the script part left out)."""
    package = root / "fastdeploy" / "cache_manager"
    package.mkdir(parents=True)
    (root / "fastdeploy" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "cache_messager.py").write_text(TARGET.split("from fastdeploy_pd_fix import bootstrap")[0])
    return root


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
    assert bootstrap.is_cache_messager_script(["/x/site-packages/fastdeploy/cache_manager/cache_messager.py"])
    assert not bootstrap.is_cache_messager_script(["/x/fastdeploy/cache_manager/other.py"])
    assert not bootstrap.is_cache_messager_script([])


@pytest.mark.parametrize("value", ["0", "false", "OFF", " No ", "False"])
def test_every_off_spelling_switches_off(tmp_path, value):
    result, stderr = run_script(tmp_path / "fastdeploy" / "cache_manager" / "cache_messager.py", FD_PD_FIX=value)
    assert not result["patched"] and result["state"]["disabled"] and not result["state"]["script_hook"]
    assert f"disabled by FD_PD_FIX={value.strip()}" in stderr


@pytest.mark.parametrize("value", ["1", "true", "ON", " yes ", ""])
def test_every_on_spelling_keeps_the_plugin_on_without_a_warning(tmp_path, value):
    result, stderr = run_script(tmp_path / "fastdeploy" / "cache_manager" / "cache_messager.py", FD_PD_FIX=value)
    assert result["patched"] and not result["state"]["disabled"] and "not understood" not in stderr


def test_an_unknown_switch_value_stays_on_and_warns_once_on_the_decision_line(tmp_path):
    result, stderr = run_script(tmp_path / "fastdeploy" / "cache_manager" / "cache_messager.py", FD_PD_FIX="disable")
    assert result["patched"] and result["mode"] == "ordered"
    decision = [line for line in stderr.splitlines() if "patched __main__.CacheMessagerV1" in line]
    assert len(decision) == 1 and " WARNING " in decision[0], stderr
    assert "FD_PD_FIX='disable' is not understood" in decision[0] and stderr.count("not understood") == 1


def test_the_imported_module_is_patched_after_execution_without_wrapt(tmp_path):
    root = fake_fastdeploy(tmp_path / "path")
    completed = subprocess.run(
        [sys.executable, "-c", IMPORTER],
        env=clean_environment(PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["state"]["import_hook"] and result["module"] == "fastdeploy.cache_manager.cache_messager"
    assert result["patched"] and result["patched_after_reload"] and result["mode"] == "ordered"
    # The module keeps its own loader (inspect and linecache read the source through it); wrapt is not imported.
    assert result["loader"] == result["spec_loader"] == "SourceFileLoader" and result["source_found"]
    assert not result["wrapt"]


def test_no_import_hook_where_fastdeploy_is_not_importable():
    probe = "import json, sys; from fastdeploy_pd_fix import bootstrap as b; print(json.dumps([b.state, " + (
        "any(type(f).__name__ == 'PatchAfterImport' for f in sys.meta_path)]))"
    )
    environment = {key: value for key, value in clean_environment().items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=60, cwd="/"
    )
    state, finder = json.loads(completed.stdout.strip().splitlines()[-1])
    assert state["installed"] and not state["import_hook"] and not finder


def run_pth_in(site_dir):
    """Process ``site_dir`` as a site directory (its .pth files run as at start-up) in an interpreter without
    site-packages, so that only what ``site_dir`` holds can be imported."""
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import site; site.addsitedir({str(site_dir)!r}); print('ran')"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_half_removed_install_prints_nothing(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "fastdeploy_pd_fix.pth").write_text((REPO / "fastdeploy_pd_fix.pth").read_text())
    completed = run_pth_in(site_dir)  # the package is gone, its .pth left
    assert completed.stdout.strip() == "ran" and completed.stderr == ""
    (site_dir / "fastdeploy_pd_fix" / "__pycache__").mkdir(parents=True)  # what an uninstall can leave behind
    completed = run_pth_in(site_dir)
    assert completed.stdout.strip() == "ran" and completed.stderr == ""


def test_a_broken_package_gives_one_line_not_a_traceback(tmp_path):
    site_dir = tmp_path / "site"
    (site_dir / "fastdeploy_pd_fix").mkdir(parents=True)
    (site_dir / "fastdeploy_pd_fix.pth").write_text((REPO / "fastdeploy_pd_fix.pth").read_text())
    (site_dir / "fastdeploy_pd_fix" / "__init__.py").write_text("")
    (site_dir / "fastdeploy_pd_fix" / "bootstrap.py").write_text("import a_module_that_does_not_exist\n")
    completed = run_pth_in(site_dir)
    assert completed.stdout.strip() == "ran"
    assert completed.stderr.startswith("fastdeploy_pd_fix: start-up hook not run: ModuleNotFoundError")
    assert len(completed.stderr.splitlines()) == 1 and "Error processing line" not in completed.stderr


def test_the_pth_file_is_one_import_line():
    lines = (REPO / "fastdeploy_pd_fix.pth").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")  # site.py executes only lines starting with import


MODULES_PROBE = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def test_the_start_up_budget_no_module_beyond_what_the_switched_off_plugin_loads(tmp_path):
    """With fastdeploy importable (import hook on, for the messager module and both engine modules) the start-up
    loads exactly the modules it loads when switched off: the hooks add no import."""
    root = fake_fastdeploy(tmp_path / "path")
    loaded = {}
    for switch in ("1", "0"):
        completed = subprocess.run(
            [sys.executable, "-c", MODULES_PROBE],
            env=clean_environment(PYTHONPATH=str(root), FD_PD_FIX=switch),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert completed.returncode == 0, completed.stderr
        loaded[switch] = set(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert loaded["1"] == loaded["0"]
    plugin = {name for name in loaded["1"] if name.startswith("fastdeploy_pd_fix")}
    assert plugin == {
        "fastdeploy_pd_fix",
        "fastdeploy_pd_fix.bootstrap",
        "fastdeploy_pd_fix.config",
        "fastdeploy_pd_fix.target",
    }


def test_the_import_hook_calls_each_module_its_own_callback(tmp_path, monkeypatch):
    package = tmp_path / "hooked_pkg"
    package.mkdir()
    for name in ("__init__", "first", "second", "third"):
        (package / f"{name}.py").write_text(f"NAME = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    finder = bootstrap.PatchAfterImport(
        {
            "hooked_pkg.first": lambda module: calls.append(("first", module.NAME)),
            "hooked_pkg.second": lambda module: calls.append(("second", module.NAME)),
        }
    )
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    try:
        import hooked_pkg.first  # noqa: F401
        import hooked_pkg.second  # noqa: F401
        import hooked_pkg.third  # noqa: F401
    finally:
        for name in [name for name in sys.modules if name.startswith("hooked_pkg")]:
            del sys.modules[name]
    assert calls == [("first", "first"), ("second", "second")]
