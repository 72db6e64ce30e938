"""``pip install -e .`` and ``pip install .`` put ``fastdeploy_pd_fix.pth`` into site-packages, and the start-up hook
then runs in every fresh interpreter of that environment.

Each test installs a copy of the project into a temporary venv, offline: the venv sees this interpreter's packages
(setuptools, wheel, pip, wrapt, numpy; not the project, which may be installed here too) through a path file, and
pip builds without isolation and without an index.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
PTH_FILE = "fastdeploy_pd_fix.pth"
#: Sorts before every other path file, so that the hook finds wrapt and numpy when it runs.
PARENT_PATH_FILE = "00_parent_site_packages.pth"
#: Entries of this interpreter's site-packages the venv must not see: the project itself, installed here too.
PROJECT_ENTRIES = ("fastdeploy_pd_fix", "__editable__")
BUILD_PROBE = """
import pip
import setuptools.command.editable_wheel
try:
    import setuptools.command.bdist_wheel
except ImportError:
    from wheel.bdist_wheel import bdist_wheel
"""
BOOTSTRAP_PROBE = """
import json
from fastdeploy_pd_fix import _bootstrap
print(json.dumps({"state": _bootstrap.state, "file": _bootstrap.__file__}))
"""


def clean_environment() -> dict:
    """No PYTHONPATH (it would shadow the installed copy) and no plugin switches."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH" and not key.startswith("FD_PD_FIX")}


def run(command, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )


def copy_project(destination: Path) -> Path:
    """What a build reads: the top-level files (metadata, MANIFEST.in, the start-up hook) and the package."""
    destination.mkdir()
    for path in REPO.iterdir():
        if path.is_file():
            shutil.copy2(path, destination / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "fastdeploy_pd_fix", destination / "fastdeploy_pd_fix", ignore=ignore)
    return destination


def parent_packages(directory: Path) -> Path:
    """A directory of links to this interpreter's packages, without the project and without path files (a path
    file would run in no venv anyway: the venv adds this directory as a plain path, not as a site directory)."""
    directory.mkdir()
    for key in ("purelib", "platlib"):
        for entry in Path(sysconfig.get_paths()[key]).iterdir():
            link = directory / entry.name
            if not (entry.name.startswith(PROJECT_ENTRIES) or entry.suffix == ".pth" or link.exists()):
                link.symlink_to(entry)
    return directory


def offline_venv(directory: Path):
    """A venv without pip of its own that sees this interpreter's packages after its own: (python, site-packages)."""
    if importlib.util.find_spec("venv") is None:
        pytest.skip(f"the install test needs the venv module in {sys.executable}")
    venv.EnvBuilder(with_pip=False).create(directory)
    python = directory / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], directory)
    site_packages = Path(purelib.stdout.strip())
    (site_packages / PARENT_PATH_FILE).write_text(f"{parent_packages(directory.parent / 'parent-packages')}\n")
    probe = run([python, "-c", BUILD_PROBE], directory)
    if probe.returncode != 0:
        pytest.skip(
            "an offline install needs pip and setuptools>=64 with bdist_wheel (setuptools>=70.1, or the wheel "
            f"package) in {sys.executable}: {probe.stderr.strip().splitlines()[-1:]}"
        )
    return python, site_packages


def install_and_probe(tmp_path: Path, *pip_options: str):
    python, site_packages = offline_venv(tmp_path / "venv")
    project = copy_project(tmp_path / "project")
    installed = run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", *pip_options, project],
        tmp_path,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = run([python, "-c", BOOTSTRAP_PROBE], tmp_path)  # cwd outside the copy: only the install can import it
    assert probe.returncode == 0, probe.stderr
    return site_packages, project, json.loads(probe.stdout.strip().splitlines()[-1])


def test_editable_install_puts_the_pth_into_site_packages_and_the_hook_runs(tmp_path):
    site_packages, project, bootstrap = install_and_probe(tmp_path, "-e")
    assert (site_packages / PTH_FILE).read_text() == (REPO / PTH_FILE).read_text()
    assert bootstrap["state"]["installed"] is True and bootstrap["state"]["disabled"] is False
    assert Path(bootstrap["file"]).resolve() == (project / "fastdeploy_pd_fix" / "_bootstrap.py").resolve()


def test_regular_install_puts_the_pth_into_site_packages_and_the_hook_runs(tmp_path):
    site_packages, _, bootstrap = install_and_probe(tmp_path)
    assert (site_packages / PTH_FILE).read_text() == (REPO / PTH_FILE).read_text()
    assert bootstrap["state"]["installed"] is True and bootstrap["state"]["disabled"] is False
    assert Path(bootstrap["file"]).resolve() == (site_packages / "fastdeploy_pd_fix" / "_bootstrap.py").resolve()
