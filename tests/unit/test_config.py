"""Switches that cannot be misread: every ``FD_PD_FIX*`` reader gives ``(value, warning)``, each warning reaches the
log once (decision line, messager log) and ``status`` prints it; ``status`` does not show a switched-off plugin's mode
as if it were in use."""

import logging
import queue
import threading

import pytest

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.plugin.messager import runtime
from fastdeploy_pd_fix.plugin.messager.patch import patch_class, unpatch_class
from fastdeploy_pd_fix.plugin.status import print_status

logger = logging.getLogger("test_config.messager")  # the plugin logs into the target module's `logger`


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "off", "Off", "no", " no\n", "\t0 "])
def test_off_spellings(value):
    assert config.switch({config.ENV_SWITCH: value}) == (False, None) and config.switched_off({"FD_PD_FIX": value})


@pytest.mark.parametrize("value", ["1", "true", "True", "on", "YES", "", "  "])
def test_on_spellings(value):
    assert config.switch({config.ENV_SWITCH: value}) == (True, None)


def test_unset_is_on():
    assert config.switch({}) == (True, None) and not config.switched_off({})


@pytest.mark.parametrize("value", ["2", "disable", "0ff", "n", "-1", "off please"])
def test_anything_else_stays_on_with_a_warning(value):
    on, warning = config.switch({config.ENV_SWITCH: value})
    assert on and f"FD_PD_FIX={value!r} is not understood" in warning and "stays on" in warning


def test_every_injection_stage_parses_and_the_old_syntax_still_works():
    value = (
        "registration:rank=1:delay_ms=500, registration_after_barrier:rank=1:delay_ms=300,signal:rank=0:delay_ms=20"
    )
    assert config.injections({config.ENV_INJECT: value}) == (
        [
            config.Injection("registration", 1, 0.5),
            config.Injection("registration_after_barrier", 1, 0.3),
            config.Injection("signal", 0, 0.02),
        ],
        [],
    )
    assert {injection.stage for injection in config.parse_injection(value)[0]} == set(config.INJECTION_STAGES)


@pytest.mark.parametrize(
    "value, deadline",
    [("30", 30.0), (" 2.5 ", 2.5), ("0.5", 0.5), ("1e3", 1000.0), ("", None), ("0", None), ("0.0", None)],
)
def test_watchdog_values_understood_without_a_warning(value, deadline):
    assert config.watchdog_setting({config.ENV_WATCHDOG: value}) == (deadline, None)
    assert config.watchdog_deadline({config.ENV_WATCHDOG: value}) == deadline


@pytest.mark.parametrize("value", ["30s", "nan", "NaN", "inf", "-inf", "-1", "soon", "1,5"])
def test_watchdog_values_not_understood_switch_it_off_with_a_warning(value):
    deadline, warning = config.watchdog_setting({config.ENV_WATCHDOG: value})
    assert deadline is None and "is not a positive number of seconds; the watchdog is off" in warning


@pytest.mark.parametrize("value", ["1e-7", "0.1", "0.49"])
def test_watchdog_below_the_minimum_is_raised_to_it_with_a_warning(value):
    deadline, warning = config.watchdog_setting({config.ENV_WATCHDOG: value})
    assert deadline == config.MIN_WATCHDOG_S == 0.5 and "below the minimum; using 0.5 s" in warning


def get_output_kv_signal(buffer, *args):
    raise AssertionError("not called here")


class Messager:
    """The CacheMessagerV1 shape the plugin recognises; the registration loop stores nothing."""

    def __init__(self):
        self.engine_cache_task_thread_lock = threading.Lock()
        self.engine_cache_tasks = [dict() for _ in range(8)]
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = queue.Queue()
        self.rank_id = 0

    def consume_signals(self):
        buffer = None
        get_output_kv_signal(buffer, self.rank_id, 0)

    def _add_cache_task_thread(self):
        for task in []:
            self.idx_cache_task_dict[task["current_id"]] = task


@pytest.fixture
def switches(monkeypatch):
    for name in (config.ENV_SWITCH, config.ENV_MODE, config.ENV_WATCHDOG, config.ENV_INJECT):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    unpatch_class(Messager)


def activate(caplog):
    messager = Messager()
    with caplog.at_level(logging.INFO):
        messager._add_cache_task_thread()  # activation, then the original loop
    return messager, getattr(messager, runtime.RUNTIME_ATTRIBUTE)


@pytest.mark.parametrize(
    "value, deadline, warning",
    [("30s", None, "is not a positive number"), ("1e-7", 0.5, "below the minimum"), ("7", 7.0, None)],
)
def test_the_watchdog_warning_reaches_the_messager_log_once(switches, caplog, value, deadline, warning):
    switches.setenv(config.ENV_WATCHDOG, value)
    patch_class(Messager)
    _, active = activate(caplog)
    try:
        assert (active.watchdog.deadline_s if active.watchdog else None) == deadline
        warnings = [record for record in caplog.records if config.ENV_WATCHDOG in record.getMessage()]
        if warning is None:
            assert warnings == []
        else:
            assert len(warnings) == 1 and warning in warnings[0].getMessage()
            assert warnings[0].levelno == logging.WARNING and warnings[0].name == logger.name
    finally:
        if active.watchdog:
            active.watchdog.stop.set()


def test_an_unknown_switch_is_on_the_decision_line_in_both_logs(switches, caplog):
    switches.setenv(config.ENV_SWITCH, "enable")
    with caplog.at_level(logging.INFO):
        record = patch_class(Messager)
    assert record.decision == "patched" and "FD_PD_FIX='enable' is not understood" in record.reason
    activate(caplog)
    lines = [r for r in caplog.records if "FD_PD_FIX='enable'" in r.getMessage()]
    # One on stderr (the fastdeploy_pd_fix logger: launch_cache_messager_R.log), one in the messager's own log.
    assert [r.name for r in lines] == ["fastdeploy_pd_fix", logger.name], [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and "active on rank_id=0" in lines[1].getMessage()


def test_status_when_switched_off_says_the_mode_is_not_used(switches, capsys):
    switches.setenv(config.ENV_SWITCH, "off")
    switches.setenv(config.ENV_WATCHDOG, "30")
    print_status()
    out = capsys.readouterr().out
    assert "switch:      FD_PD_FIX=off: off" in out
    assert "mode:        ordered (not used: the plugin is switched off)" in out
    assert "watchdog:    30 s (not used: the plugin is switched off)" in out
    assert "active on rank_id" not in out


def test_status_prints_every_warning(switches, capsys):
    switches.setenv(config.ENV_SWITCH, "maybe")
    switches.setenv(config.ENV_MODE, "fastest")
    switches.setenv(config.ENV_WATCHDOG, "30s")
    switches.setenv(config.ENV_INJECT, "bogus:rank=1")
    print_status()
    out = capsys.readouterr().out
    assert "switch:      FD_PD_FIX=maybe: on (warning: FD_PD_FIX='maybe' is not understood" in out
    assert "mode:        ordered (warning: FD_PD_FIX_MODE='fastest' is not one of" in out
    assert "watchdog:    off (warning: FD_PD_FIX_WATCHDOG_S='30s' is not a positive number" in out
    assert "injection:   FD_PD_FIX_INJECT item 'bogus:rank=1' ignored" in out
    assert "'active on rank_id=N'" in out
