"""The command line as users run it: status (with the import hook), demo --json, verify, python -m."""

import json
import os
import subprocess
import sys

import pytest

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.analysis import CANNOT_RACE
from fastdeploy_pd_fix.cli import main
from fastdeploy_pd_fix.standin import STANDIN_ROOT


def run_cli(*args, **env):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FD_PD_FIX")}
    completed = subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix", *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    return completed


def test_status_with_fastdeploy_importable_reports_the_import_hook_patch():
    completed = run_cli("status", PYTHONPATH=str(STANDIN_ROOT), FD_STANDIN_7724="1")  # a release that can race
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "bootstrap:   active (import hook on" in out
    assert "FastDeploy:  2.6.0.standin" in out
    assert "target:      CacheMessagerV1 recognised; get_output_kv_signal(buf, self.rank_id, 0)" in out
    assert (
        "this process: fastdeploy_pd_fix 0.1.0: patched fastdeploy.cache_manager.cache_messager.CacheMessagerV1 "
        "(mode=ordered, fastdeploy=2.6.0.standin)" in out
    )
    assert "CacheMessagerV1.consume_signals: replaced" in out
    before_7724 = run_cli("status", PYTHONPATH=str(STANDIN_ROOT)).stdout  # the stand-in's default variant
    assert f"target:      CacheMessagerV1 recognised, stands aside: {CANNOT_RACE}" in before_7724
    assert "this process: fastdeploy_pd_fix 0.1.0: stood aside fastdeploy.cache_manager" in before_7724


def test_status_switched_off_and_without_fastdeploy():
    off = run_cli("status", PYTHONPATH=str(STANDIN_ROOT), FD_PD_FIX="0", FD_PD_FIX_MODE="upstream")
    assert "switched off by FD_PD_FIX=0" in off.stdout and "mode:        upstream" in off.stdout
    assert "this process:" not in off.stdout  # nothing was patched
    bare = run_cli("status")
    assert "fastdeploy.cache_manager.cache_messager not importable" in bare.stdout and bare.returncode == 0
    assert "manifest" in bare.stdout


def test_demo_json_gives_every_mode_and_scenario():
    completed = run_cli("demo", "--json")
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(results) == {config.OFF, config.UPSTREAM, config.ORDERED} == {"off", "upstream", "ordered"}
    outcomes = {
        mode: {name: result["outcome"] for name, result in scenarios.items()} for mode, scenarios in results.items()
    }
    assert outcomes["off"] == {"s0": "finished", "s1": "hang", "s2": "hang", "s3": "hang"}
    assert outcomes["upstream"] == {"s0": "finished", "s1": "finished", "s2": "hang", "s3": "hang"}
    assert outcomes["ordered"] == {"s0": "finished", "s1": "finished", "s2": "finished", "s3": "finished"}
    ordered_s3 = results["ordered"]["s3"]["batches"]
    assert ordered_s3["0"] == ordered_s3["1"] == [[[0, 4], [1, 4]], [[0, 8]]]


@pytest.mark.parametrize("mode, code", [("ordered", 0), ("upstream", 1)])
def test_verify_exit_code(mode, code, capsys):
    assert main(["verify", "--quick", "--mode", mode]) == code
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == mode and (summary["violations"] == 0) == (code == 0)


def test_no_command_prints_help(capsys):
    assert main([]) == 2 and "status" in capsys.readouterr().out
