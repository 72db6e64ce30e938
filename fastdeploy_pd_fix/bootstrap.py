"""Start-up hook run from ``fastdeploy_pd_fix.pth`` in every interpreter of the environment (as coverage.py does).

It must be cheap and must never fail the interpreter: at import it loads only :mod:`fastdeploy_pd_fix.config` and
:mod:`fastdeploy_pd_fix.target` (stdlib modules the interpreter has already loaded, nothing else; the plugin itself
is imported when there is something to patch), reads ``FD_PD_FIX`` first (off: it returns right there), then
``sys.argv`` and, where FastDeploy can be involved, installs one of two hooks:

* FastDeploy runs the cache messager as a script (``python .../fastdeploy/cache_manager/cache_messager.py``), so
  its classes are built in ``__main__`` and no import hook ever sees them. In that process only, we wrap
  ``builtins.__build_class__`` until ``CacheMessagerV1`` has been built, patch it right there (before ``main()``
  creates the instance and its threads), and put the original ``__build_class__`` back.
* Anywhere the ``fastdeploy`` package is importable at start-up, a post-import hook patches
  ``fastdeploy.cache_manager.cache_messager`` right after it has been executed (upstream's unit tests, tools), and
  the two engine modules of the engine-side patch (``target.ENGINE_MODULES``: the resource manager and the splitwise
  connector, imported by FastDeploy's engine process): :class:`PatchAfterImport`, a ``sys.meta_path`` finder built
  like wrapt's post-import hooks. Not wrapt itself:
  importing wrapt (2.x pulls asyncio, ssl, inspect, typing) costs 60-130 ms in every interpreter of a FastDeploy
  environment, and the budget there is 10 ms (``benchmarks/startup.py`` measures it).
"""

from __future__ import annotations

import _thread
import builtins
import os
import sys

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.target import ENGINE_MODULES, SCRIPT_PATH, TARGET_CLASS, TARGET_MODULE

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
            from fastdeploy_pd_fix.plugin.messager.patch import patch_class

            patch_class(cls)
        except Exception as error:  # never break the cache messager because of the plugin
            print(f"fastdeploy_pd_fix: not patched, bootstrap error: {error!r}", file=sys.stderr)
    return cls


def _patch_imported_module(module) -> None:
    try:
        _configure_logging()
        from fastdeploy_pd_fix.plugin.messager.patch import patch_module

        patch_module(module)
    except Exception as error:
        print(f"fastdeploy_pd_fix: not patched, bootstrap error: {error!r}", file=sys.stderr)


def _patch_imported_engine_module(module) -> None:
    try:
        _configure_logging()
        from fastdeploy_pd_fix.plugin.engine.patch import patch_engine_module

        patch_engine_module(module)
    except Exception as error:  # never break the engine because of the plugin
        print(f"fastdeploy_pd_fix: engine module not patched, bootstrap error: {error!r}", file=sys.stderr)


def _configure_logging() -> None:
    """Our decisions go to stderr, which FastDeploy redirects into launch_cache_messager_{rank}.log (the engine
    process: wherever its stderr goes)."""
    import logging

    logger = logging.getLogger("fastdeploy_pd_fix")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class PatchingLoader:
    """Wraps the loader of the target module: runs the original ``exec_module``, then the callback."""

    def __init__(self, loader, callback):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        create_module = getattr(self.loader, "create_module", None)
        return create_module(spec) if create_module is not None else None

    def exec_module(self, module) -> None:
        # The module keeps the original loader (inspect, linecache and reloads use it), as with wrapt.
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        self.loader.exec_module(module)
        self.callback(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... of the original loader
        return getattr(self.loader, name)


class PatchAfterImport:
    """A ``sys.meta_path`` finder that calls ``callbacks[name](module)`` once a module named in ``callbacks`` has
    been executed.

    For every other name it returns None at once (one dict look-up per import). For a hooked name it asks the
    finders after it for the spec, as the import system would, and wraps the spec's loader in a
    :class:`PatchingLoader`; a loader without ``exec_module`` (legacy) is left alone, so the module is imported as
    usual, unpatched."""

    def __init__(self, callbacks):
        self.callbacks = dict(callbacks)
        self._finding = set()  # threads inside find_spec for a hooked name

    def find_spec(self, fullname, path=None, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        thread = _thread.get_ident()
        if thread in self._finding:  # a finder after us called importlib.util.find_spec, which came back here
            return None
        self._finding.add(thread)
        try:
            for finder in list(sys.meta_path):
                find_spec = getattr(finder, "find_spec", None) if finder is not self else None
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding.discard(thread)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = PatchingLoader(spec.loader, callback)
        return spec


def findable(name: str) -> bool:
    """Whether top-level module ``name`` can be imported, without importing it (nor :mod:`importlib.util`)."""
    if name in sys.modules:
        return True
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        try:
            if find_spec is not None and find_spec(name, None) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def install() -> None:
    """Entry point of the ``.pth`` file; idempotent."""
    if state["installed"]:
        return
    state["installed"] = True
    is_script = is_cache_messager_script(sys.argv)
    if config.switched_off():
        state["disabled"] = True
        if is_script:
            value = os.environ.get(config.ENV_SWITCH, "").strip()
            print(
                f"fastdeploy_pd_fix: disabled by {config.ENV_SWITCH}={value}; FastDeploy runs unpatched",
                file=sys.stderr,
            )
        return
    # An FD_PD_FIX value that is not understood keeps the plugin on; patching.patch_class logs its warning with the
    # decision line (the messager log) and ``status`` prints it.
    if is_script:
        builtins.__build_class__ = _build_class_and_patch
        state["script_hook"] = True
    if findable("fastdeploy"):
        callbacks = {TARGET_MODULE: _patch_imported_module}
        callbacks.update(dict.fromkeys(ENGINE_MODULES, _patch_imported_engine_module))
        sys.meta_path.insert(0, PatchAfterImport(callbacks))
        state["import_hook"] = True
        for name, callback in callbacks.items():
            module = sys.modules.get(name)
            if module is not None:  # imported before us (not at start-up; install() called again by hand)
                callback(module)


def safe_install() -> None:
    try:
        install()
    except Exception as error:
        print(f"fastdeploy_pd_fix: bootstrap failed, FastDeploy runs unpatched: {error!r}", file=sys.stderr)
