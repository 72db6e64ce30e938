"""What the plugin does in FastDeploy's engine process (prefill role): the slot-lifecycle notices.

* :mod:`.patch`: the manifest of this process's patch, the checks, and the wrappers of ``ResourceManagerV1`` and
  ``SplitwiseConnector`` that put the notices of :mod:`fastdeploy_pd_fix.adapters.engine_notices` into the
  cache-info mailbox.
"""
