"""A fake FastDeploy for the harness dry run of tests/e2e/test_pd_e2e.py on CPU: the two entry points the test
starts, each turned into a stub server (../../stub_router.py, ../../stub_server.py) on the port FastDeploy would use,
and, for ``fastdeploy-pd-fix status``, the project's stand-in cache messager (``fastdeploy.cache_manager`` and what
it imports come from the stand-in package; ``FD_STANDIN_7724`` chooses a release before or after #7724).
"""

from fastdeploy_pd_fix.standin import STANDIN_ROOT

__version__ = "0.0.0.e2e-harness-fake"
__path__.append(str(STANDIN_ROOT / "fastdeploy"))  # noqa: F821  (a package's __path__)
