"""A fake FastDeploy for the harness dry run of tests/e2e/test_pd_e2e.py on CPU: only the two entry points the test
starts, each turned into a stub server (../../stub_router.py, ../../stub_server.py) on the port FastDeploy would use.
"""

__version__ = "0.0.0.e2e-harness-fake"
