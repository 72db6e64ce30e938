"""Rank-invariant layer-0 release for the prefill cache messager (PD disaggregation).

* ``policy/``: the pure decision logic, no FastDeploy object, thread, sleep or I/O: kv-signal parsing
  (``kv_signal``), the slot-lifecycle notices (``notice``) and the release policies (``release``).
* ``adapters/``: what connects it to FastDeploy's objects: the messager's per-signal step, registration and notice
  handling (``messager_step``, used by ``CacheMessagerV1``) and the notices the engine puts (``engine_notices``,
  used by ``ResourceManagerV1`` and ``SplitwiseConnector``).
"""
