"""``pip install -e .``, ``pip install .`` and the built artefacts (sdist and wheel, as ``python -m build`` makes
them) put ``fastdeploy_pd_fix.pth`` into site-packages, the start-up hook then runs in every fresh interpreter of that
environment and patches a stand-in messager run, and ``pip uninstall`` removes all of it.

Each test installs a copy of the project into a temporary venv, offline: the venv sees this interpreter's packages
(setuptools, wheel, pip, numpy, paddle; not the project, which may be installed here too) through a path file, and
pip builds without isolation and without an index.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from fastdeploy_pd_fix.standin.harness import run_scenario

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
PTH_FILE = "fastdeploy_pd_fix.pth"
#: Sorts before every other path file, so that the plugin finds numpy (and the stand-in paddle) when it runs.
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
from fastdeploy_pd_fix import bootstrap
print(json.dumps({"state": bootstrap.state, "file": bootstrap.__file__}))
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
    assert Path(bootstrap["file"]).resolve() == (project / "fastdeploy_pd_fix" / "bootstrap.py").resolve()


def test_regular_install_puts_the_pth_into_site_packages_and_the_hook_runs(tmp_path):
    site_packages, _, bootstrap = install_and_probe(tmp_path)
    assert (site_packages / PTH_FILE).read_text() == (REPO / PTH_FILE).read_text()
    assert bootstrap["state"]["installed"] is True and bootstrap["state"]["disabled"] is False
    assert Path(bootstrap["file"]).resolve() == (site_packages / "fastdeploy_pd_fix" / "bootstrap.py").resolve()


#: What ``python -m build --no-isolation`` does: the sdist from the tree, then the wheel from the unpacked sdist (so
#: the wheel shows what the sdist carries). The backend is called directly: ``build`` is not a test requirement.
BUILD_SDIST = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
BUILD_WHEEL = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"


def last_line(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """``{"sdist": path, "wheel": path}`` built from a copy of the project."""
    root = tmp_path_factory.mktemp("artefacts")
    python, _ = offline_venv(root / "build-venv")  # skips where an offline build is impossible
    project, dist = copy_project(root / "project"), root / "dist"
    dist.mkdir()
    sdist = dist / last_line(run([python, "-c", BUILD_SDIST, dist], project))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[-1] for name in archive.getnames()}
        archive.extractall(root / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    assert {PTH_FILE, "LICENSE", "MANIFEST.in", "fastdeploy_pd_fix/bootstrap.py"} <= names
    unpacked = root / "unpacked" / sdist.name[: -len(".tar.gz")]
    wheel = dist / last_line(run([python, "-c", BUILD_WHEEL, dist], unpacked))
    with zipfile.ZipFile(wheel) as archive:
        assert PTH_FILE in archive.namelist() and "fastdeploy_pd_fix/standin/harness.py" in archive.namelist()
    return {"sdist": sdist, "wheel": wheel}


def installed_files(venv_dir: Path, site_packages: Path):
    """What of the project is in the venv: site-packages entries and the console script."""
    entries = sorted(path.name for path in site_packages.iterdir() if path.name.startswith("fastdeploy_pd_fix"))
    script = venv_dir / "bin" / "fastdeploy-pd-fix"
    return entries + ([script.name] if script.exists() else [])


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_each_artefact_installs_patches_a_standin_messager_run_and_uninstalls_cleanly(
    kind, artefacts, tmp_path, monkeypatch
):
    venv_dir = tmp_path / "venv"
    python, site_packages = offline_venv(venv_dir)
    installed = run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", artefacts[kind]], tmp_path
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (site_packages / PTH_FILE).read_text() == (REPO / PTH_FILE).read_text()
    probe = json.loads(last_line(run([python, "-c", BOOTSTRAP_PROBE], tmp_path)))
    assert probe["state"]["installed"] is True and probe["state"]["disabled"] is False
    assert Path(probe["file"]).resolve() == (site_packages / "fastdeploy_pd_fix" / "bootstrap.py").resolve()

    # A stand-in messager run with the venv's interpreter: its rank processes find the plugin only in the venv.
    for name in [key for key in os.environ if key == "PYTHONPATH" or key.startswith("FD_PD_FIX")]:
        monkeypatch.delenv(name)
    result = run_scenario(
        "s2", release="8034", python=str(python), standin_root=site_packages / "fastdeploy_pd_fix" / "standin"
    )
    assert result.outcome == "finished" and result.same_batches_on_all_ranks(), result.summary()
    for rank, log in result.logs.items():
        assert "patched __main__.CacheMessagerV1 (mode=ordered" in log and "active on rank_id=" in log, (rank, log)

    assert set(installed_files(venv_dir, site_packages)) >= {"fastdeploy_pd_fix", PTH_FILE, "fastdeploy-pd-fix"}
    removed = run([python, "-m", "pip", "uninstall", "-y", "fastdeploy-pd-fix"], tmp_path)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert installed_files(venv_dir, site_packages) == []
    after = run([python, "-c", "import sys; print('fastdeploy_pd_fix' in sys.modules)"], tmp_path)
    assert last_line(after) == "False" and after.stderr == ""
