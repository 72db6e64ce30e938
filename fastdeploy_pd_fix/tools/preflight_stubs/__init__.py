"""Stubs for what a real FastDeploy ``cache_messager.py`` imports, used by ``fastdeploy-pd-fix preflight``.

These modules are never imported from the project: preflight copies this package into its temporary tree as
``fastdeploy/_preflight/``, next to the release's own ``fastdeploy/cache_manager/cache_messager.py`` (copied
unmodified), a copy of the stand-in's scripted streams (``fastdeploy/pd_fix_standin/``) and one generated module per
``fastdeploy.*`` module the file imports (each resolves every name through :mod:`.names`). Inside that tree they
import each other as ``fastdeploy._preflight.*`` and the scripted streams as ``fastdeploy.pd_fix_standin.*``.

Why a package of its own rather than inside the stand-in: the stand-in *is* a FastDeploy (its own
``cache_messager.py``, written from the facts); these stubs are what lets somebody else's ``cache_messager.py`` run,
and they reuse the stand-in's machinery (engine-side manager with real barriers, scripted kv signals and cache-info
reads forced by handshakes, ground truth, progress file) by copying its modules into the tree.

* :mod:`.names`: the name registry (by name, whatever module a release imports it from), the permissive
  placeholder for names nobody knows, ``envs``, and the CPU shim for paddle's GPU-only calls.
* :mod:`.engine`: the engine worker queue (a client of the harness's engine process), IPC signals, the transfer
  managers, and the tap that plays the scenario once the messager reports its cache ready.
* :mod:`.barriers`: a queue's barrier with what a stub does right after it (the tap's send check, a slice rank's
  scheduled hold).
* The engine slice's (:mod:`fastdeploy_pd_fix.tools.engine_slice`): :mod:`.slice_engine`, its engine process;
  :mod:`.slice_prefill`, the prefill instance around the release's engine files; :mod:`.slice_messagers`, the
  release's messager ranks it runs; :mod:`.slice_rank`, what differs in such a rank.
"""
