"""The plugin: what is patched into FastDeploy's processes, organised by the process it patches.

* :mod:`.patching`: the one patch state machine (analyse -> patch or stand aside; unpatch) and the form of the
  manifests and decision records, for both processes.
* :mod:`.messager`: each cache messager process: ``CacheMessagerV1`` (its manifest and patch in
  :mod:`.messager.patch`).
* :mod:`.engine`: the engine process, prefill role: ``ResourceManagerV1`` and ``SplitwiseConnector`` put the
  slot-lifecycle notices into the cache-info stream (``FD_PD_FIX_ENGINE_NOTICES``; its manifest and patch in
  :mod:`.engine.patch`).
* :mod:`.status`: what ``fastdeploy-pd-fix status`` prints.
"""

#: Prefix of every line the plugin logs into the messager's log (FastDeploy with the fix uses ``layer0_release: ``).
LOG_PREFIX = "fastdeploy_pd_fix: "
