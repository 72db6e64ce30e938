"""``demo`` and ``preflight`` set every ``FD_PD_FIX*`` variable of their runs themselves: what a caller exported
(the plugin off, an injected delay, a watchdog) cannot change what they show, and the report names what it ignored."""

import json
import os
import subprocess
import sys

from support.installed import require_plugin_installed

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.target import SCRIPT_PATH
from fastdeploy_pd_fix.tools import preflight

#: A caller's leftovers: the plugin switched off, a delay longer than any deadline on every signal, a watchdog.
EXPORTED = {
    config.ENV_SWITCH: "0",
    config.ENV_INJECT: "signal:rank=0:delay_ms=60000",
    config.ENV_WATCHDOG: "0.5",
}
IGNORED_LINE = (
    f"environment: ignored {config.ENV_SWITCH}=0, {config.ENV_INJECT}=signal:rank=0:delay_ms=60000, "
    f"{config.ENV_WATCHDOG}=0.5 (each run sets its own)"
)


def run_tool(*args, **exported):
    """The command line with ``exported`` as the only ``FD_PD_FIX*`` variables of the caller."""
    require_plugin_installed()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(config.ENV_SWITCH)}
    return subprocess.run(
        [sys.executable, "-m", "fastdeploy_pd_fix", *args],
        env={**environment, **exported},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_demo_with_the_plugin_switched_off_by_the_caller_still_shows_every_mode():
    completed = run_tool("demo", "--json", **EXPORTED)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results.pop("environment_ignored") == EXPORTED
    outcomes = {mode: {name: run["outcome"] for name, run in runs.items()} for mode, runs in results.items()}
    assert set(outcomes[config.ORDERED].values()) == {"finished"}, outcomes
    assert outcomes[config.OFF]["s1"] == outcomes[config.UPSTREAM]["s2"] == "hang", outcomes


def test_a_callers_injection_does_not_change_the_preflight_verdict(capsys):
    source = str(STANDIN_ROOT / SCRIPT_PATH)  # its default variant cannot race: forced anyway
    arguments = ("preflight", "--json", "--source", source, "--scenarios", "s1", "--patch-non-racing")
    clean, exported = run_tool(*arguments), run_tool(*arguments, **EXPORTED)
    clean_report, exported_report = json.loads(clean.stdout), json.loads(exported.stdout)
    assert clean.returncode == exported.returncode == preflight.EXIT_PASS, exported_report["verdict"]
    assert exported_report["verdict"] == clean_report["verdict"]
    for mode in preflight.MODES:
        assert exported_report["scenarios"]["s1"][mode]["outcome"] == clean_report["scenarios"]["s1"][mode]["outcome"]
    assert clean_report["environment_ignored"] == {} and exported_report["environment_ignored"] == EXPORTED
    preflight.print_report(exported_report)
    assert IGNORED_LINE in capsys.readouterr().out.splitlines()
    preflight.print_report(clean_report)
    assert "environment:" not in capsys.readouterr().out
