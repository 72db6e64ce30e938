"""The functional core: kv-signal parsing, the release policies and the messager's engine-facing step.

Standard library and numpy only, and only relative imports inside the package: ``make-patch`` copies these files
verbatim into FastDeploy as ``fastdeploy/cache_manager/layer0_release/``, so that the plugin and a FastDeploy that
carries the fix run the same code.
"""
