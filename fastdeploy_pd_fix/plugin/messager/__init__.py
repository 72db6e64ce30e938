"""What the plugin does in each cache messager process (one per tensor-parallel rank of a prefill instance).

* :mod:`.patch`: the manifest of this process's patch and patching ``CacheMessagerV1`` (analyse, then patch or
  stand aside).
* :mod:`.runtime`: activation per messager instance and the two patched methods (thin adapters around
  :mod:`fastdeploy_pd_fix.adapters.messager_step`).
* :mod:`.observe`: the held batch and, in observe mode, the journal of FastDeploy's own batches; the watchdog.
* :mod:`.inject`: fault injection (``FD_PD_FIX_INJECT``).
"""
