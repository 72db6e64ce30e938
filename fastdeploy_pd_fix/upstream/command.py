"""``fastdeploy-pd-fix make-patch``: commit the fix on a new branch of a FastDeploy checkout, write it as patches.

    fastdeploy-pd-fix make-patch --repo ~/FastDeploy [--base release/2.6] [--mode ordered] [--out pd-fix-patches]
    fastdeploy-pd-fix make-patch --portable-only --out patches      # the branch-independent part, in a scratch repo

The commit (on ``pd-fix/layer0-release`` by default, from ``--base``) holds the portable part (:mod:`.generate`)
unless the base has it already, the branch-specific ``cache_messager.py`` (:mod:`.rewrite`) and, where the branch's
two engine files are recognised, the engine-side notices (:mod:`.rewrite_engine`; otherwise a note says why). A
checkout that is not recognised, one that already uses ``layer0_release``, and a dirty working tree are refused with
a message and exit code 1, an ``--out`` that could not be written with exit code 2; nothing is changed then.
"""

from __future__ import annotations

import ast
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from fastdeploy_pd_fix.arguments import OneLineParser, output_folder
from fastdeploy_pd_fix.policy import release
from fastdeploy_pd_fix.upstream import PACKAGE_PATH, TARGET_PATH, MakePatchError, git, message
from fastdeploy_pd_fix.upstream.generate import portable_files
from fastdeploy_pd_fix.upstream.rewrite import patch_source
from fastdeploy_pd_fix.upstream.rewrite_engine import ENGINE_PATHS, EngineNotRecognised, patch_engine

DEFAULT_BRANCH = "pd-fix/layer0-release"
DEFAULT_OUT = "pd-fix-patches"
#: The file whose presence on the base means the portable part is there.
PACKAGE_MARKER = f"{PACKAGE_PATH}/__init__.py"


@dataclass
class PatchResult:
    branch: str
    base: str
    title: str
    patches: List[Path]
    notes: List[str]


def _new_portable_files(repo: Path, base: str, base_commit: str) -> Dict[str, str]:
    """The portable files the base lacks; refused if one is there with other content."""
    files = {}
    for path, text in portable_files().items():
        existing = git.show(repo, base_commit, path)
        if existing is None:
            files[path] = text
        elif existing.decode("utf-8", errors="replace") != text:
            raise MakePatchError(f"{path} exists on {base} and differs from what this version generates")
    return files


def _wire_engine(repo: Path, base_commit: str, files: Dict[str, str]) -> Optional[str]:
    """Add the engine files with the notices wired in to ``files``; or why not (nothing added then)."""
    sources = {}
    for path in ENGINE_PATHS:
        text = git.show(repo, base_commit, path)
        try:
            sources[path] = None if text is None else text.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{path} is not UTF-8: {error}"
    try:
        files.update(patch_engine(sources))
    except EngineNotRecognised as error:
        return str(error)
    return None


def make_patch(
    repo,
    *,
    base: Optional[str] = None,
    mode: str = release.ORDERED,
    out=DEFAULT_OUT,
    branch: str = DEFAULT_BRANCH,
    upstream_pr: Optional[str] = None,
    portable_only: bool = False,
    no_verify: bool = False,
    zero_commit: bool = False,
    commit_env: Optional[dict] = None,
) -> PatchResult:
    """Commit the fix on a new branch of the git checkout ``repo`` and write ``git format-patch`` files to ``out``.

    Everything is checked before anything changes; a refusal raises :class:`MakePatchError`. ``commit_env``: extra
    environment of the ``git commit`` call (e.g. fixed dates).
    """
    if not git.succeeds(Path(repo), "rev-parse", "--git-dir"):
        raise MakePatchError(f"{repo} is not a git checkout")
    repo = Path(git.run(Path(repo), "rev-parse", "--show-toplevel").strip())
    if git.run(repo, "status", "--porcelain", "--untracked-files=no").strip():
        raise MakePatchError(f"the working tree of {repo} has uncommitted changes; commit or stash them first")
    base = base or git.current_branch(repo)
    if not git.succeeds(repo, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"):
        raise MakePatchError(f"base {base!r} is not a branch or commit of {repo}")
    base_commit = git.run(repo, "rev-parse", "--verify", f"{base}^{{commit}}").strip()

    files = _new_portable_files(repo, base, base_commit)
    notes: List[str] = []
    analysis = None
    if portable_only:
        if not files:
            raise MakePatchError(f"{PACKAGE_PATH}/ and its test are already on {base}: nothing to do")
        title, text = message.PORTABLE_TITLE, message.portable_message()
    else:
        target = git.show(repo, base_commit, TARGET_PATH)
        if target is None:
            raise MakePatchError(f"{base} has no {TARGET_PATH}; this checkout is not recognised")
        try:
            source = target.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MakePatchError(f"{TARGET_PATH} is not UTF-8: {error}") from error
        files[TARGET_PATH], analysis = patch_source(source, mode)
        engine_unwired = _wire_engine(repo, base_commit, files)
        if engine_unwired:
            notes.append(f"engine side not wired: {engine_unwired}; the commit message names the calls to add")
        title = message.commit_title(base, upstream_pr)
        store = ast.unparse(analysis.task_stores[0])
        text = message.full_message(
            title, base, mode, analysis, store, upstream_pr, PACKAGE_MARKER in files, engine_unwired
        )
        if message.is_release_branch(base) and not upstream_pr:
            placeholder = message.UPSTREAM_PR_PLACEHOLDER
            notes.append(f"title uses the placeholder #{placeholder}: amend it, or rerun with --upstream-pr N")
    if git.succeeds(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"):
        raise MakePatchError(f"branch {branch} already exists in {repo}; delete it or pass --branch")
    for path in files:
        if (repo / path).exists() and not git.is_tracked(repo, path):
            raise MakePatchError(f"untracked {path} in {repo} would be overwritten; move it away first")

    identity = []
    if not git.succeeds(repo, "config", "user.email"):
        name, email = git.SCRATCH_IDENTITY
        identity = ["-c", f"user.name={name}", "-c", f"user.email={email}"]
        notes.append(f"git user.email is not set: committed as {name} <{email}>")
    git.commit_on_new_branch(repo, branch, base_commit, files, text, identity, no_verify, commit_env)
    patches = git.format_patches(repo, base_commit, branch, Path(out).resolve(), zero_commit)
    if analysis is not None:
        notes.append(f"target: {analysis.features()}")
    return PatchResult(branch, base, title, patches, notes)


def portable_patch(out) -> List[Path]:
    """Write the portable patch (the new package and its test) into ``out``, made in a scratch repository.

    The scratch repository holds just ``fastdeploy/cache_manager/__init__.py``; the patch only adds files, so it
    applies with ``git am`` to any FastDeploy branch. Commit dates come from ``SOURCE_DATE_EPOCH`` when set.
    """
    stamp = os.environ.get("SOURCE_DATE_EPOCH", str(int(time.time())))
    dates = {"GIT_AUTHOR_DATE": f"@{stamp} +0000", "GIT_COMMITTER_DATE": f"@{stamp} +0000"}
    with tempfile.TemporaryDirectory(prefix="pd-fix-portable-") as scratch:
        git.init_scratch_repository(Path(scratch), dates)
        result = make_patch(scratch, portable_only=True, out=out, zero_commit=True, commit_env=dates)
    return result.patches


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(
        prog="fastdeploy-pd-fix make-patch",
        description="Commit the rank-invariant layer-0 release into a FastDeploy git checkout and write it as "
        "git format-patch files (apply them with `git am --keep-non-patch`, which keeps the [BugFix][KVCache] tags).",
    )
    parser.add_argument("--repo", help="FastDeploy git checkout (optional with --portable-only: a scratch repo)")
    parser.add_argument("--base", help="branch or commit to start from (default: the current branch)")
    parser.add_argument(
        "--mode", choices=release.RELEASE_MODES, default=release.ORDERED, help="release policy to wire in"
    )
    # Checked now, not once the branch is committed: the patch files must be writable where they are asked for.
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        type=output_folder,
        help=f"directory for the patch files (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--branch", default=DEFAULT_BRANCH, help=f"new branch to commit on (default: {DEFAULT_BRANCH})"
    )
    parser.add_argument(
        "--upstream-pr",
        help="number of the develop PR, for the [Cherry-Pick] title on release/* bases "
        f"(default: the placeholder #{message.UPSTREAM_PR_PLACEHOLDER})",
    )
    parser.add_argument(
        "--portable-only", action="store_true", help="only the new package and its test (no cache_messager.py change)"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the checkout's git commit hooks")
    args = parser.parse_args(argv)
    try:
        if args.repo is None:
            if not args.portable_only:
                parser.error("--repo is required (it is optional only with --portable-only)")
            for patch in portable_patch(args.out):
                print(patch)
            return 0
        result = make_patch(
            args.repo,
            base=args.base,
            mode=args.mode,
            out=args.out,
            branch=args.branch,
            upstream_pr=args.upstream_pr,
            portable_only=args.portable_only,
            no_verify=args.no_verify,
        )
    except MakePatchError as error:
        print(f"make-patch: refused: {error}", file=sys.stderr)
        return 1
    print(f"committed on {result.branch} (from {result.base}): {result.title}")
    for note in result.notes:
        print(f"note: {note}")
    for patch in result.patches:
        print(patch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
