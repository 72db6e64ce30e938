"""The plugin: what is patched into FastDeploy's running ``CacheMessagerV1`` (and, for the notices, its engine) and
what it does there.

* :mod:`.patching`: the patch manifest (what, why, how, upstream, when to remove), analyse -> patch / unpatch.
* :mod:`.runtime`: activation per messager instance and the two patched methods (thin adapters around
  :mod:`fastdeploy_pd_fix.adapters.messager_step`).
* :mod:`.observe`: the held batch and, in observe mode, the journal of FastDeploy's own batches; the watchdog.
* :mod:`.engine`: the engine-side patch in FastDeploy's engine process (``ResourceManagerV1``,
  ``SplitwiseConnector``): slot-lifecycle notices into the cache-info stream (``FD_PD_FIX_ENGINE_NOTICES``).
* :mod:`.inject`: fault injection (``FD_PD_FIX_INJECT``).
* :mod:`.status`: what ``fastdeploy-pd-fix status`` prints.
"""

#: Prefix of every line the plugin logs into the messager's log (FastDeploy with the fix uses ``layer0_release: ``).
LOG_PREFIX = "fastdeploy_pd_fix: "
