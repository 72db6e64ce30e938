"""End-to-end PD tests: a real FastDeploy router, prefill and decode servers on GPUs (``test_pd_e2e.py``).

``orchestration`` starts, watches and stops the servers; ``fastdeploy_servers`` knows FastDeploy's command lines,
the settings and the workload. Both use the standard library only (and ``fastdeploy_pd_fix.config``, itself
standard library only), so ``tests/processes/test_e2e_harness.py`` can check the harness on CPU against the stub
servers in ``stubs/``.
"""
