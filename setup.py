"""Setuptools glue: ship ``fastdeploy_pd_fix.pth`` at the top of site-packages, as coverage.py and pytest-cov do.

Both ``pip install .`` (build_py) and ``pip install -e .`` (editable_wheel) must install it, or the plugin would
silently not start in FastDeploy's processes.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_FILE = Path(__file__).parent / "fastdeploy_pd_fix.pth"


class BuildPyWithPth(build_py):
    """Copy the start-up hook next to the package in the wheel."""

    def run(self):
        super().run()
        self.copy_file(str(PTH_FILE), str(Path(self.build_lib) / PTH_FILE.name))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH_FILE.name)]


class EditableWheelWithPth(editable_wheel):
    """Put the start-up hook into the root of the editable wheel too (it points at the working tree)."""

    def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
        shutil.copy(PTH_FILE, Path(unpacked_wheel) / PTH_FILE.name)
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
