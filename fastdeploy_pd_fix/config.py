"""Every ``FD_PD_FIX*`` environment variable, read and validated here and nowhere else.

Each reader takes the environment as an argument (``os.environ`` by default) and returns ``(value, warning)``: the
value it understood and, where the variable held something it did not understand, the warning to log once (None
otherwise); a bad value never raises. Each fallback is the documented safe one: an unknown ``FD_PD_FIX`` keeps the
plugin on, an unknown mode is ``ordered``, a bad watchdog deadline is no watchdog, a bad injection item is skipped.

The start-up hook imports this module in every interpreter, so it imports nothing the interpreter has not already
loaded at start-up (``os``, ``collections``).
"""

from __future__ import annotations

import os
from collections import namedtuple

ENV_SWITCH = "FD_PD_FIX"
ENV_MODE = "FD_PD_FIX_MODE"
ENV_WATCHDOG = "FD_PD_FIX_WATCHDOG_S"
ENV_INJECT = "FD_PD_FIX_INJECT"
ENV_ENGINE_NOTICES = "FD_PD_FIX_ENGINE_NOTICES"
ENV_PATCH_NON_RACING = "FD_PD_FIX_PATCH_NON_RACING"

# Plugin modes: the two release policies of policy/release.py, and observe (FastDeploy's own release, watched).
ORDERED = "ordered"
UPSTREAM = "upstream"
OBSERVE = "observe"
PLUGIN_MODES = (ORDERED, UPSTREAM, OBSERVE)
DEFAULT_MODE = ORDERED

#: ``registration``: before ``cache_info_barrier`` (every rank waits there as long: symmetric);
#: ``registration_after_barrier``: after it, on the named rank only; ``signal``: before a layer-0 signal is handled.
#: Where each delay lands: :mod:`fastdeploy_pd_fix.plugin.messager.inject`.
INJECTION_STAGES = ("registration", "registration_after_barrier", "signal")
MAX_INJECTED_DELAY_MS = 3_600_000

#: Delay ``stage`` (one of :data:`INJECTION_STAGES`) on tensor-parallel rank ``rank`` by ``delay_s`` per event.
Injection = namedtuple("Injection", "stage rank delay_s")


#: On/off spellings of ``FD_PD_FIX`` and ``FD_PD_FIX_ENGINE_NOTICES`` (compared after ``strip().lower()``); unset or
#: empty is on.
SWITCH_OFF_VALUES = ("0", "false", "off", "no")
SWITCH_ON_VALUES = ("1", "true", "on", "yes", "")

#: ``FD_PD_FIX_WATCHDOG_S`` below this is raised to it: the watchdog polls every ``min(1, deadline / 4)`` seconds.
MIN_WATCHDOG_S = 0.5


def _on_off(environ, name: str, what_stays_on: str):
    """``(on, warning)`` from an on/off variable: 0/false/off/no (any case, surrounding whitespace ignored) is off;
    1/true/on/yes, empty or unset is on; anything else is on, with a warning (the safe side)."""
    raw = environ.get(name)
    value = (raw or "").strip().lower()
    if value in SWITCH_OFF_VALUES:
        return False, None
    if value in SWITCH_ON_VALUES:
        return True, None
    return True, (
        f"{name}={raw!r} is not understood (off: {'/'.join(SWITCH_OFF_VALUES)}, on: "
        f"{'/'.join(SWITCH_ON_VALUES[:-1])}); {what_stays_on}"
    )


def switch(environ=os.environ):
    """``(on, warning)`` from ``FD_PD_FIX`` (see :func:`_on_off`; an unknown value keeps the fix on)."""
    return _on_off(environ, ENV_SWITCH, "the plugin stays on")


def switched_off(environ=os.environ) -> bool:
    """``FD_PD_FIX`` says off: the plugin installs no hook and patches nothing."""
    return not switch(environ)[0]


def switch_value(environ=os.environ) -> str:
    """``FD_PD_FIX`` as set (``<unset>`` when it is not)."""
    return environ.get(ENV_SWITCH, "<unset>")


def selected_mode(environ=os.environ):
    """``(mode, warning)`` from ``FD_PD_FIX_MODE``; an unknown value falls back to the default with a warning."""
    value = environ.get(ENV_MODE, DEFAULT_MODE).strip().lower() or DEFAULT_MODE
    if value in PLUGIN_MODES:
        return value, None
    return DEFAULT_MODE, f"{ENV_MODE}={value!r} is not one of {', '.join(PLUGIN_MODES)}; using {DEFAULT_MODE}"


def engine_notices(environ=os.environ):
    """``(on, warning)``: whether the engine-side patch puts slot-lifecycle notices into the cache-info stream.

    On only when the plugin is on, the mode is ``ordered`` (the only policy that reads them) and
    ``FD_PD_FIX_ENGINE_NOTICES`` is not off (same spellings as ``FD_PD_FIX``; an unknown value keeps it on, with a
    warning). Off, the messagers read no engine announcement and release by upstream's rule (release rule 10)."""
    if switched_off(environ) or selected_mode(environ)[0] != ORDERED:
        return False, None
    return _on_off(environ, ENV_ENGINE_NOTICES, "notices stay on")


def patch_non_racing(environ=os.environ):
    """``(on, warning)`` from ``FD_PD_FIX_PATCH_NON_RACING``, off unless set to 1/true/on/yes: whether to patch a
    ``CacheMessagerV1`` that cannot race (its engine waits for every rank's registration report) anyway. Only tools
    that force races such a release's engine cannot produce set it (the stand-in, ``preflight --patch-non-racing``);
    anything else is off, an unknown value with a warning (the safe side: stand aside)."""
    value = (environ.get(ENV_PATCH_NON_RACING) or "").strip().lower()
    if value in SWITCH_ON_VALUES and value:
        return True, None
    if value in SWITCH_OFF_VALUES or not value:
        return False, None
    return False, f"{ENV_PATCH_NON_RACING}={environ[ENV_PATCH_NON_RACING]!r} is not 1/true/on/yes: stays off"


def watchdog_setting(environ=os.environ):
    """``(seconds or None, warning)`` from ``FD_PD_FIX_WATCHDOG_S``.

    Unset, empty or ``0``: no watchdog, no warning. A positive finite number of seconds: that deadline, raised to
    :data:`MIN_WATCHDOG_S` with a warning when below it. Anything else (``30s``, ``nan``, ``inf``, ``-1``): no
    watchdog, with a warning."""
    raw = environ.get(ENV_WATCHDOG, "")
    value = raw.strip()
    if not value:
        return None, None
    try:
        deadline = float(value)
    except ValueError:
        deadline = float("nan")
    if deadline == 0:
        return None, None
    if not 0 < deadline < float("inf"):  # also false for nan
        return None, f"{ENV_WATCHDOG}={raw!r} is not a positive number of seconds; the watchdog is off"
    if deadline < MIN_WATCHDOG_S:
        return MIN_WATCHDOG_S, f"{ENV_WATCHDOG}={raw!r} is below the minimum; using {MIN_WATCHDOG_S:g} s"
    return deadline, None


def watchdog_deadline(environ=os.environ):
    """``FD_PD_FIX_WATCHDOG_S`` as seconds, or None (see :func:`watchdog_setting`, which also gives the warning)."""
    return watchdog_setting(environ)[0]


def parse_injection(value: str):
    """Parse ``registration_after_barrier:rank=1:delay_ms=500,signal:rank=0:delay_ms=20``: ``(injections, problems)``.

    Items are ``<stage>:rank=<R>:delay_ms=<D>`` separated by commas, ``stage`` one of :data:`INJECTION_STAGES`
    (``registration``: the read delayed before ``cache_info_barrier``, symmetric; ``registration_after_barrier``: the
    store delayed after it, on rank ``R`` only; ``signal``: the handling of each layer-0 signal, in every mode)."""
    injections, problems = [], []
    for item in filter(None, (part.strip() for part in value.split(","))):
        stage, *fields = item.split(":")
        options = dict(field.split("=", 1) for field in fields if "=" in field)
        try:
            if stage not in INJECTION_STAGES:
                raise ValueError(f"unknown stage {stage!r}")
            delay_ms = float(options["delay_ms"])
            if not 0 <= delay_ms <= MAX_INJECTED_DELAY_MS:  # also false for nan; time.sleep would raise later
                raise ValueError(f"delay_ms {options['delay_ms']!r} not in [0, {MAX_INJECTED_DELAY_MS}]")
            injections.append(Injection(stage, int(options["rank"]), delay_ms / 1000.0))
        except (KeyError, ValueError) as error:
            problems.append(f"{ENV_INJECT} item {item!r} ignored: {error!r}")
    return injections, problems


def injections(environ=os.environ):
    """``FD_PD_FIX_INJECT`` parsed: ``(injections, problems)``; a bad item is skipped with its problem."""
    return parse_injection(environ.get(ENV_INJECT, ""))


#: The plugin switched off (``FD_PD_FIX=0``): FastDeploy as released. Demo, stress and harness columns use it.
OFF = "off"
RUN_MODES = (OFF,) + PLUGIN_MODES


def environment_for(mode: str) -> dict:
    """The environment variables that run a cache messager in ``mode`` (one of :data:`RUN_MODES`)."""
    if mode == OFF:
        return {ENV_SWITCH: "0"}
    if mode not in PLUGIN_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(RUN_MODES)}")
    return {ENV_MODE: mode}
