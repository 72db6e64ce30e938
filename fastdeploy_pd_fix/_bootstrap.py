"""Start-up hook run from ``fastdeploy_pd_fix.pth`` in every interpreter of the environment (as coverage.py does).

It must be cheap and must never fail the interpreter: at import it loads only :mod:`fastdeploy_pd_fix.config` and
:mod:`fastdeploy_pd_fix.target` (the plugin itself is imported when there is something to patch), reads the
environment and ``sys.argv`` and, where FastDeploy can be involved, installs one of two hooks:

* FastDeploy runs the cache messager as a script (``python .../fastdeploy/cache_manager/cache_messager.py``), so
  its classes are built in ``__main__`` and no import hook ever sees them. In that process only, we wrap
  ``builtins.__build_class__`` until ``CacheMessagerV1`` has been built, patch it right there (before ``main()``
  creates the instance and its threads), and put the original ``__build_class__`` back.
* Anywhere the ``fastdeploy`` package is importable, a wrapt post-import hook patches
  ``fastdeploy.cache_manager.cache_messager`` when it is imported (upstream's unit tests, tools).
"""

from __future__ import annotations

import builtins
import os
import sys

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.target import SCRIPT_PATH, TARGET_CLASS, TARGET_MODULE

#: What this interpreter's bootstrap did, for ``fastdeploy-pd-fix status`` and the tests.
state = {"installed": False, "script_hook": False, "import_hook": False, "disabled": False}
_original_build_class = builtins.__build_class__


def is_cache_messager_script(argv) -> bool:
    return bool(argv) and str(argv[0]).replace(os.sep, "/").endswith(SCRIPT_PATH)


def _build_class_and_patch(func, name, *bases, **kwargs):
    cls = _original_build_class(func, name, *bases, **kwargs)
    if name == TARGET_CLASS and getattr(cls, "__module__", None) == "__main__":
        builtins.__build_class__ = _original_build_class
        state["script_hook"] = False
        try:
            _configure_logging()
            from fastdeploy_pd_fix.plugin.patching import patch_class

            patch_class(cls)
        except Exception as error:  # never break the cache messager because of the plugin
            print(f"fastdeploy_pd_fix: not patched, bootstrap error: {error!r}", file=sys.stderr)
    return cls


def _patch_imported_module(module) -> None:
    try:
        _configure_logging()
        from fastdeploy_pd_fix.plugin.patching import patch_module

        patch_module(module)
    except Exception as error:
        print(f"fastdeploy_pd_fix: not patched, bootstrap error: {error!r}", file=sys.stderr)


def _configure_logging() -> None:
    """Our decisions go to stderr, which FastDeploy redirects into launch_cache_messager_{rank}.log."""
    import logging

    logger = logging.getLogger("fastdeploy_pd_fix")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def install() -> None:
    """Entry point of the ``.pth`` file; idempotent."""
    if state["installed"]:
        return
    state["installed"] = True
    is_script = is_cache_messager_script(sys.argv)
    if config.switched_off():
        state["disabled"] = True
        if is_script:
            print("fastdeploy_pd_fix: disabled by FD_PD_FIX=0; FastDeploy runs unpatched", file=sys.stderr)
        return
    if is_script:
        builtins.__build_class__ = _build_class_and_patch
        state["script_hook"] = True

    import importlib.util

    try:
        fastdeploy_present = importlib.util.find_spec("fastdeploy") is not None
    except (ImportError, ValueError):
        fastdeploy_present = False
    if fastdeploy_present:  # wrapt costs ~60 ms to import: pay it only where FastDeploy is
        import wrapt

        wrapt.register_post_import_hook(_patch_imported_module, TARGET_MODULE)
        state["import_hook"] = True


def safe_install() -> None:
    try:
        install()
    except Exception as error:
        print(f"fastdeploy_pd_fix: bootstrap failed, FastDeploy runs unpatched: {error!r}", file=sys.stderr)
