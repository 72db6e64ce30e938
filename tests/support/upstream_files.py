"""The real upstream ``cache_messager.py`` files: test data in ``../shared/upstream`` beside the repository (see its
README), run unmodified and never copied. Tests that need them skip with one reason when the folder is absent."""

from pathlib import Path

import pytest

from fastdeploy_pd_fix.tools.preflight import defines_target_class

UPSTREAM = Path(__file__).resolve().parents[2] / ".." / "shared" / "upstream"
UPSTREAM_FILES = sorted(UPSTREAM.glob("cache_messager@*.py")) if UPSTREAM.is_dir() else []
#: The files with a ``CacheMessagerV1``, the plugin's target.
TARGET_FILES = [path for path in UPSTREAM_FILES if defines_target_class(path.read_text(encoding="utf-8"))]
needs_upstream = pytest.mark.skipif(not UPSTREAM_FILES, reason=f"no real upstream files in {UPSTREAM.resolve()}")
