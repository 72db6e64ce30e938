"""The adapters between FastDeploy's objects and :mod:`fastdeploy_pd_fix.policy`.

* :mod:`.messager_step`: ``CacheMessagerV1``'s side: the per-signal step, registrations and notices read from
  ``cache_info``, and the consume loop.
* :mod:`.messager_log`: what a messager logs over weeks, bounded: the batch journal, the count summary, the report of
  a repeating error.
* :mod:`.engine_notices`: the engine's side: which notices ``ResourceManagerV1`` puts, read off its objects.

Standard library and numpy only, the policy by relative import: ``make-patch`` copies these files verbatim into
FastDeploy as ``fastdeploy/cache_manager/layer0_release/adapters/``, so that the plugin and a FastDeploy that
carries the fix run the same code.
"""
