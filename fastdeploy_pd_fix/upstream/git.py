"""The git plumbing of ``make-patch``: every failure is a :class:`~fastdeploy_pd_fix.upstream.MakePatchError`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from fastdeploy_pd_fix.upstream import MakePatchError

#: Identity of the commits made in a scratch repository (``--portable-only`` without ``--repo``).
SCRATCH_IDENTITY = ("fastdeploy-pd-fix", "fastdeploy-pd-fix@users.noreply.github.com")


def run(repo: Path, *args: str, input_text: Optional[str] = None, env: Optional[dict] = None) -> str:
    """The output of ``git -C repo args...``, or MakePatchError with git's message."""
    result = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input_text,
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    if result.returncode != 0:
        raise MakePatchError(f"git {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def succeeds(repo: Path, *args: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True).returncode == 0


def show(repo: Path, base: str, path: str) -> Optional[bytes]:
    """``path`` as committed on ``base``, or None when it is not there."""
    result = subprocess.run(["git", "-C", str(repo), "show", f"{base}:{path}"], capture_output=True)
    return result.stdout if result.returncode == 0 else None


def current_branch(repo: Path) -> str:
    """The checked-out branch, or ``HEAD`` when it is detached."""
    current = subprocess.run(["git", "-C", str(repo), "symbolic-ref", "-q", "--short", "HEAD"], capture_output=True)
    return current.stdout.decode().strip() or "HEAD"


def is_tracked(repo: Path, path: str) -> bool:
    return succeeds(repo, "ls-files", "--error-unmatch", path)


def commit_on_new_branch(
    repo: Path,
    branch: str,
    base_commit: str,
    files: Dict[str, str],
    message: str,
    identity: List[str],
    no_verify: bool,
    commit_env: Optional[dict],
) -> None:
    """Create ``branch`` at ``base_commit``, write and commit ``files``; on failure go back to where we were."""
    original = run(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    if original == "HEAD":
        original = run(repo, "rev-parse", "HEAD").strip()
    run(repo, "checkout", "--quiet", "-b", branch, base_commit)
    try:
        for path, text in files.items():
            target_file = repo / path
            target_file.parent.mkdir(parents=True, exist_ok=True)
            target_file.write_bytes(text.encode("utf-8"))
        run(repo, "add", "--", *files)
        commit_args = ["commit", "--quiet", "--cleanup=whitespace", "-F", "-"] + (["--no-verify"] * no_verify)
        run(repo, *identity, *commit_args, input_text=message, env=commit_env)
    except MakePatchError as error:
        run(repo, "reset", "--quiet", "--hard")  # the tree was clean: this drops only what was written above
        for path in files:
            if (repo / path).exists() and not is_tracked(repo, path):
                (repo / path).unlink()
        run(repo, "checkout", "--quiet", original)
        run(repo, "branch", "--quiet", "-D", branch)
        raise MakePatchError(f"{error} (nothing committed; commit hooks can be skipped with --no-verify)") from error


def format_patches(repo: Path, base_commit: str, branch: str, out: Path, zero_commit: bool) -> List[Path]:
    """``git format-patch`` of ``base_commit..branch`` into ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    format_args = ["format-patch", "--no-signature", "-o", str(out)]  # a signature line ends in a space
    format_args += ["--zero-commit"] if zero_commit else []
    return [Path(path) for path in run(repo, *format_args, f"{base_commit}..{branch}").splitlines()]


def init_scratch_repository(repo: Path, dates: dict) -> None:
    """A repository holding just ``fastdeploy/cache_manager/__init__.py``, committed as :data:`SCRATCH_IDENTITY`."""
    run(repo, "init", "--quiet", "--initial-branch=develop")
    run(repo, "config", "user.name", SCRATCH_IDENTITY[0])
    run(repo, "config", "user.email", SCRATCH_IDENTITY[1])
    run(repo, "config", "core.hooksPath", os.devnull)
    (repo / "fastdeploy" / "cache_manager").mkdir(parents=True)
    (repo / "fastdeploy" / "cache_manager" / "__init__.py").write_text("", encoding="utf-8")
    run(repo, "add", ".")
    run(repo, "commit", "--quiet", "-m", "scratch FastDeploy layout", env=dates)
