"""The portable part of the patch: new files only, the same for every FastDeploy branch.

``fastdeploy/cache_manager/layer0_release/`` holds the files of :mod:`fastdeploy_pd_fix.core` byte for byte after
FastDeploy's license header, so that a FastDeploy that carries the fix runs the very code the plugin runs. Its unit
test is ``templates/test_layer0_release.py``, a real Python file (linted with the rest of this project).
"""

from __future__ import annotations

import ast
import sys
from importlib import resources
from pathlib import Path
from typing import Dict

from fastdeploy_pd_fix import core
from fastdeploy_pd_fix.upstream import PACKAGE_PATH, TEST_PATH, MakePatchError

TEMPLATES = resources.files(__package__) / "templates"
CORE_DIRECTORY = Path(core.__file__).resolve().parent


def template(name: str) -> str:
    """The text of ``templates/<name>``."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _check_portable(name: str, source: str) -> None:
    """A copied file may import the standard library, numpy and its own package (relative imports) only."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            foreign = [module for module in modules if module.split(".")[0] not in sys.stdlib_module_names | {"numpy"}]
            if foreign:
                raise MakePatchError(f"core/{name} imports {', '.join(foreign)}; it cannot be copied upstream")


def package_files() -> Dict[str, str]:
    """FastDeploy path -> text of every file of ``layer0_release/``: the license header, then the core file."""
    header = template("license_header.txt")
    files = {}
    for path in sorted(CORE_DIRECTORY.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        _check_portable(path.name, source)
        files[f"{PACKAGE_PATH}/{path.name}"] = f"{header}\n{source}"
    return files


def unit_test_file() -> str:
    """The text of ``tests/cache_manager/test_layer0_release.py`` (FastDeploy's pytest style, CPU and numpy only)."""
    return f"{template('license_header.txt')}\n{template('test_layer0_release.py')}"


def portable_files() -> Dict[str, str]:
    """Every file the portable part adds: the package, then its test."""
    return {**package_files(), TEST_PATH: unit_test_file()}
