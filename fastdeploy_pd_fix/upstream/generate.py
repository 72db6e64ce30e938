"""The portable part of the patch: new files only, the same for every FastDeploy branch.

``fastdeploy/cache_manager/layer0_release/`` holds the files of :mod:`fastdeploy_pd_fix.policy` (the pure release
policy) and :mod:`fastdeploy_pd_fix.adapters` (what intercepts the messager's and the engine's objects) byte for byte
after FastDeploy's license header, as its subpackages ``policy/`` and ``adapters/``, so that a FastDeploy that
carries the fix runs the very code the plugin runs. Its own ``__init__.py`` is ``templates/layer0_release_init.py``;
its unit test is ``templates/test_layer0_release.py``, both real Python files (linted with the rest of this
project).
"""

from __future__ import annotations

import ast
import sys
from importlib import resources
from pathlib import Path
from typing import Dict

from fastdeploy_pd_fix import adapters, policy
from fastdeploy_pd_fix.upstream import PACKAGE_PATH, TEST_PATH, MakePatchError

TEMPLATES = resources.files(__package__) / "templates"
#: The subpackages copied, by their name in ``layer0_release/`` (the same as ours).
COPIED_PACKAGES = {
    package.__name__.rsplit(".", 1)[1]: Path(package.__file__).resolve().parent for package in (policy, adapters)
}


def template(name: str) -> str:
    """The text of ``templates/<name>``."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _check_portable(relative: str, source: str) -> None:
    """A copied file may import the standard library, numpy and its own package (relative imports) only."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            foreign = [module for module in modules if module.split(".")[0] not in sys.stdlib_module_names | {"numpy"}]
            if foreign:
                raise MakePatchError(f"{relative} imports {', '.join(foreign)}; it cannot be copied upstream")


def copied_sources() -> Dict[str, Path]:
    """Path inside ``layer0_release/`` -> our file it copies."""
    return {
        f"{name}/{path.name}": path for name, folder in COPIED_PACKAGES.items() for path in sorted(folder.glob("*.py"))
    }


def package_files() -> Dict[str, str]:
    """FastDeploy path -> text of every file of ``layer0_release/``: the license header, then the copied file (its
    own ``__init__.py`` from the template)."""
    header = template("license_header.txt")
    files = {f"{PACKAGE_PATH}/__init__.py": f"{header}\n{template('layer0_release_init.py')}"}
    for relative, path in copied_sources().items():
        source = path.read_text(encoding="utf-8")
        _check_portable(relative, source)
        files[f"{PACKAGE_PATH}/{relative}"] = f"{header}\n{source}"
    return files


def unit_test_file() -> str:
    """The text of ``tests/cache_manager/test_layer0_release.py`` (FastDeploy's pytest style, CPU and numpy only)."""
    return f"{template('license_header.txt')}\n{template('test_layer0_release.py')}"


def portable_files() -> Dict[str, str]:
    """Every file the portable part adds: the package, then its test."""
    return {**package_files(), TEST_PATH: unit_test_file()}
