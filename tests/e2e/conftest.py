"""Markers of the end-to-end tests (setup.cfg is shared; the ``gpu`` marker is registered here)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs NVIDIA GPUs, FastDeploy and a model; skipped with one reason elsewhere"
    )
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line(
            "markers", "timeout(seconds): per-test time limit, enforced when pytest-timeout is installed"
        )
