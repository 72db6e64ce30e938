"""``fastdeploy-pd-fix status``: what the plugin does in this environment (bootstrap, switches, engine notices,
FastDeploy, target, manifest)."""

from __future__ import annotations

from fastdeploy_pd_fix import __version__, bootstrap, config
from fastdeploy_pd_fix.analysis import CANNOT_RACE, analyse_class
from fastdeploy_pd_fix.plugin.engine import patch as engine_patch
from fastdeploy_pd_fix.plugin.messager import patch as messager_patch
from fastdeploy_pd_fix.plugin.patching import RECORDS, fastdeploy_version
from fastdeploy_pd_fix.target import CONNECTOR_CLASS, RESOURCE_MANAGER_CLASS, TARGET_CLASS


def bootstrap_line(state) -> str:
    """One line on what the ``.pth`` start-up hook did in this interpreter."""
    if not state["installed"]:
        return (
            "NOT active: fastdeploy_pd_fix.pth did not run in this interpreter (is the plugin pip-installed into "
            "this environment?)"
        )
    if state["disabled"]:
        return f"installed, switched off by {config.ENV_SWITCH}={config.switch_value()}: nothing is patched"
    hooks = "import hook on" if state["import_hook"] else "no import hook (fastdeploy not importable at start-up)"
    return f"active ({hooks}; the cache messager script is patched as its class is built)"


def engine_line() -> str:
    """One line on the engine-side patch: whether the engine process will put slot-lifecycle notices."""
    off = engine_patch.notices_off_reason()
    if off:
        return f"notices off ({off}): the messagers release by upstream's rule (#8034), not ordered"
    return (
        f"notices on: {RESOURCE_MANAGER_CLASS} and {CONNECTOR_CLASS} are patched as the engine process imports them "
        "(prefill role only; its log has one decision line for each)"
    )


def warned(warning) -> str:
    return f" (warning: {warning})" if warning else ""


def print_status() -> int:
    """Print the status report; the exit code is always 0."""
    mode, mode_warning = config.selected_mode()
    on, switch_warning = config.switch()
    deadline, deadline_warning = config.watchdog_setting()
    unused = "" if on else " (not used: the plugin is switched off)"
    print(f"fastdeploy-pd-fix {__version__}")
    print(f"bootstrap:   {bootstrap_line(bootstrap.state)}")
    print(
        f"switch:      {config.ENV_SWITCH}={config.switch_value()}: {'on' if on else 'off'}" + warned(switch_warning)
    )
    print(f"mode:        {mode}{unused}" + warned(mode_warning))
    watchdog = f"{deadline:g} s" if deadline else "off"
    print(f"watchdog:    {watchdog}{unused if deadline else ''}" + warned(deadline_warning))
    print(f"engine:      {engine_line()}" + warned(config.engine_notices()[1]))
    for problem in config.injections()[1]:
        print(f"injection:   {problem}")
    if on:
        print(
            "check:       a patched prefill messager logs 'active on rank_id=N' in its cache_messager_rank*.log "
            "(one per TP rank); 'patched' alone is the class, not a running messager"
        )
    try:
        from fastdeploy.cache_manager import cache_messager
    except Exception as error:  # FastDeploy absent, or its import needs a GPU build
        cache_messager = None
        print(
            f"FastDeploy:  {fastdeploy_version()}; fastdeploy.cache_manager.cache_messager not importable: {error!r}"
        )
    if cache_messager is not None:
        print(f"FastDeploy:  {fastdeploy_version()} ({getattr(cache_messager, '__file__', '?')})")
        cls = getattr(cache_messager, TARGET_CLASS, None)
        if cls is None:
            print(f"target:      no {TARGET_CLASS}: nothing to patch (the plugin stands aside)")
        else:
            analysis = analyse_class(cls)
            verdict = "recognised" if analysis.recognised else f"not recognised, stands aside: {analysis.reason}"
            if analysis.cannot_race and not config.patch_non_racing()[0]:
                verdict = f"recognised, stands aside: {CANNOT_RACE}"
            print(f"target:      {TARGET_CLASS} {verdict}; {analysis.features()}")
        for record in RECORDS:
            print(f"this process: {record.describe()}")
    print("manifest (details: fastdeploy_pd_fix/plugin/messager/patch.py, fastdeploy_pd_fix/plugin/engine/patch.py):")
    for patch in messager_patch.MANIFEST + engine_patch.MANIFEST:
        print(f"  {patch.target}: {patch.how}; upstream {patch.upstream}; remove when {patch.remove_when}")
    return 0
