"""The pure release policy: kv-signal parsing, slot-lifecycle notices and the release rules.

No FastDeploy object, thread, lock, sleep, paddle or I/O: the tests and the interleaving explorer drive the very
code that ships. Standard library and numpy only, and only relative imports inside the package: ``make-patch``
copies these files verbatim into FastDeploy as ``fastdeploy/cache_manager/layer0_release/policy/``.
"""
