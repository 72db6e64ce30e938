"""The one check that tests running real FastDeploy-shaped processes need first: the plugin's ``.pth`` ran here."""

from fastdeploy_pd_fix import bootstrap


def require_plugin_installed() -> None:
    assert bootstrap.state[
        "installed"
    ], "fastdeploy_pd_fix.pth did not run in this interpreter: install the plugin (pip install . or -e .) first"
