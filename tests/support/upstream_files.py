"""The real upstream ``cache_messager.py`` files: test data in ``../shared/upstream`` beside the repository (see its
README), run unmodified and never copied. Tests that need them skip with one reason when the folder is absent."""

import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

from fastdeploy_pd_fix.target import SCRIPT_PATH
from fastdeploy_pd_fix.tools.preflight import defines_target_class

UPSTREAM = Path(__file__).resolve().parents[2] / ".." / "shared" / "upstream"
UPSTREAM_FILES = sorted(UPSTREAM.glob("cache_messager@*.py")) if UPSTREAM.is_dir() else []
#: The files with a ``CacheMessagerV1``, the plugin's target.
TARGET_FILES = [path for path in UPSTREAM_FILES if defines_target_class(path.read_text(encoding="utf-8"))]
needs_upstream = pytest.mark.skipif(not UPSTREAM_FILES, reason=f"no real upstream files in {UPSTREAM.resolve()}")

#: A row of the README's engine table: the file, then its path in FastDeploy (or "the same path, release X").
_ENGINE_ROW = re.compile(
    r"^\| `(?P<file>[\w@.]+\.py)` \| (?:`(?P<path>[\w/.]+)`[^|]*|the same path, (?P<release>[^|]+?)) \|"
)


def engine_files() -> Dict[str, Tuple[str, str]]:
    """README's engine files: file name -> (path in FastDeploy, release); release is "" for the release/2.6 ones."""
    rows, paths = {}, {}
    for line in (UPSTREAM / "README.md").read_text(encoding="utf-8").splitlines():
        match = _ENGINE_ROW.match(line)
        if match:
            module = match["file"].split("@")[0]
            paths.setdefault(module, match["path"])
            rows[match["file"]] = (match["path"] or paths[module], match["release"] or "")
    return rows


def release_tree(root: Path, release: str = "", messager: Optional[str] = "cache_messager@gongshaotian_8a1e71d0.py"):
    """Lay out a FastDeploy checkout under ``root`` from the README's engine files of ``release`` ("": release/2.6)
    and ``messager`` (copies of the test data, in a temporary folder); return its ``fastdeploy`` package dir."""
    chosen = {name: path for name, (path, of) in engine_files().items() if of == release}
    if messager:
        chosen[messager] = SCRIPT_PATH
    for name, path in chosen.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(UPSTREAM / name, root / path)
    return root / "fastdeploy"


needs_engine_files = pytest.mark.skipif(
    not (UPSTREAM / "README.md").is_file() or not engine_files(),
    reason=f"no real upstream engine files listed in {UPSTREAM.resolve() / 'README.md'}",
)
