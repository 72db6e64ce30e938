"""``make-patch`` on throwaway FastDeploy-like git repositories rendered from the stand-in release variants.

One repository holds three branches, each a rendered stand-in release (``develop`` = #8034 with #7724 and the 4-arg
op, ``release/2.6`` = #7872 with the 3-arg op, ``release/2.5`` = pre-#7872 with the 4-arg op). make-patch runs on
each, its output is applied with ``git am`` to a fresh clone, and the patched clone runs the race scenarios s1-s3
with the plugin switched off (``FD_PD_FIX=0``): what finishes there is the upstream patch's doing alone, and its
logs read by ``diagnose`` like the plugin's.
"""

import ast
import difflib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import engine_model
from support.render import VARIANT_NAMES, render_cache_messager, render_standin

from fastdeploy_pd_fix.analysis import analyse_source
from fastdeploy_pd_fix.policy import release
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.standin.harness import run_many
from fastdeploy_pd_fix.tools.diagnose import diagnose
from fastdeploy_pd_fix.upstream import PACKAGE_PATH, TARGET_PATH, TEST_PATH, MakePatchError, command, generate, message
from fastdeploy_pd_fix.upstream.rewrite import patch_source, rewritable
from fastdeploy_pd_fix.upstream.rewrite_engine import ENGINE_PATHS, RESOURCE_MANAGER_PATH, patch_engine

# One module-scoped batch of 10 multi-process runs (about 10 s on 2 idle cores); allow for a loaded machine.
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("git") is None, reason="make-patch works on git checkouts"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BRANCHES = {
    "develop": {"release": "8034", "with_7724": True, "op_args": 4},
    "release/2.6": {"release": "7872", "with_7724": False, "op_args": 3},
    "release/2.5": {"release": "pre7872", "with_7724": False, "op_args": 4},
}
SCENARIOS = ("s1", "s2", "s3")
PLUGIN_OFF = {"FD_PD_FIX": "0"}
DEADLINE_S = 2.5  # after every rank is ready; a finishing run needs about 0.1 s
UPSTREAM_PR = "9001"
OP = "get_output_kv_signal"


def git(cwd, *args, check=True):
    result = subprocess.run(["git", *args], cwd=str(cwd), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {result.stderr}")
    return result.stdout


def init_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=develop")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "core.hooksPath", os.devnull)
    (path / "README.md").write_text("FastDeploy-like test repository\n", encoding="utf-8")
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "root")
    return path


#: The branch that also holds our model of the two engine files make-patch wires the notices into.
ENGINE_BRANCH = "develop"


def commit_variant(repo: Path, branch: str, variant: dict) -> None:
    """A branch off the root commit holding the stand-in rendered for ``variant`` (and, on :data:`ENGINE_BRANCH`,
    the engine model's files)."""
    root = git(repo, "rev-list", "--max-parents=0", "HEAD").split()[0]
    git(repo, "checkout", "--quiet", "-B", branch, root)
    render_standin(repo, **variant)
    for path, text in engine_model.fastdeploy_files().items() if branch == ENGINE_BRANCH else ():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", f"stand-in {variant}")


def clone(source: Path, dest: Path, branch: str) -> Path:
    git(source.parent, "clone", "--quiet", "--branch", branch, str(source), str(dest))
    git(dest, "config", "user.name", "Test")
    git(dest, "config", "user.email", "test@example.com")
    return dest


@dataclass
class Patched:
    result: command.PatchResult
    clone: Path
    variant: dict


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("make-patch")


@pytest.fixture(scope="module")
def source_repo(workspace):
    repo = init_repo(workspace / "FastDeploy")
    for branch, variant in BRANCHES.items():
        commit_variant(repo, branch, variant)
    git(repo, "checkout", "--quiet", "develop")
    return repo


@pytest.fixture(scope="module")
def patched(source_repo, workspace):
    """make-patch for every branch (develop with the defaults), applied with git am to a fresh clone each."""
    patched = {}
    for index, (base, variant) in enumerate(BRANCHES.items()):
        if base == "develop":
            result = command.make_patch(source_repo, out=workspace / "out-develop")  # current branch, default branch
        else:
            result = command.make_patch(
                source_repo,
                base=base,
                out=workspace / f"out-{index}",
                branch=f"pd-fix/{base}",
                upstream_pr=UPSTREAM_PR if base == "release/2.6" else None,
            )
        target = clone(source_repo, workspace / f"clone-{index}", base)
        git(target, "am", "--quiet", "--keep-non-patch", *map(str, result.patches))
        patched[base] = Patched(result, target, variant)
    return patched


@pytest.fixture(scope="module")
def scenario_runs(patched, source_repo, workspace):
    """s1-s3 on every patched clone, plugin off; plus s2 on the unpatched develop branch as the control."""
    plans = [(base, name) for base in BRANCHES for name in SCENARIOS]
    runs = workspace / "runs"  # kept: diagnose reads the patched runs' logs
    runs.mkdir()
    kwargs = [
        dict(
            scenario=name,
            standin_root=patched[base].clone,
            env=PLUGIN_OFF,
            deadline_s=DEADLINE_S,
            workdir=runs,
            **BRANCHES[base],
        )
        for base, name in plans
    ]
    unpatched = clone(source_repo, workspace / "unpatched-develop", "develop")
    kwargs.insert(
        0, dict(scenario="s2", standin_root=unpatched, env=PLUGIN_OFF, deadline_s=DEADLINE_S, **BRANCHES["develop"])
    )
    results = run_many(kwargs, parallel=4)
    return {"control": results[0], **dict(zip(plans, results[1:]))}


def describe(result):
    return result.summary() + "".join(f"\n--- rank {rank} ---\n{text}" for rank, text in result.logs.items())


def read_at(repo: Path, revision: str, path: str) -> str:
    return git(repo, "show", f"{revision}:{path}")


def run_tool(*args, cwd=None):
    """Run a linter of FastDeploy's pre-commit set (skips the test where it is not installed)."""
    if importlib.util.find_spec(args[0]) is None:
        pytest.skip(f"{args[0]} is not installed (pip install '.[lint]' or the pinned pre-commit tools)")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True)


# ---- render ----


@pytest.mark.parametrize("variant", list(BRANCHES.values()), ids=lambda variant: variant["release"])
def test_render_resolves_every_variant_block_of_the_class(variant):
    source = (STANDIN_ROOT / "fastdeploy" / "cache_manager" / "cache_messager.py").read_text(encoding="utf-8")
    rendered = render_cache_messager(source, **variant)
    cls = next(node for node in ast.parse(rendered).body if getattr(node, "name", "") == "CacheMessagerV1")
    assert not [node for node in cls.body if isinstance(node, ast.If)]
    assert not {node.id for node in ast.walk(cls) if isinstance(node, ast.Name)} & set(VARIANT_NAMES)
    methods = [node.name for node in cls.body if isinstance(node, ast.FunctionDef)]
    assert len(methods) == len(set(methods))
    assert ("_maybe_wait_for_cache_task" in methods) == variant["with_7724"]
    assert ("_recover_pending_layer0_signal" in methods) == (variant["release"] != "pre7872")
    consume = next(node for node in cls.body if getattr(node, "name", "") == "consume_signals")
    calls = [node for node in ast.walk(consume) if isinstance(node, ast.Call) and ast.unparse(node.func) == OP]
    assert [len(call.args) for call in calls] == [variant["op_args"]]


# ---- the generated package and test ----


def write_portable_files(root: Path) -> dict:
    """The portable files under ``root`` as in a FastDeploy checkout; their paths."""
    paths = {}
    for relative, text in generate.portable_files().items():
        paths[relative] = root / relative
        paths[relative].parent.mkdir(parents=True, exist_ok=True)
        paths[relative].write_text(text, encoding="utf-8")
    return paths


def test_generated_package_is_policy_and_adapters_verbatim_self_contained_and_matches_our_release(tmp_path):
    files = generate.package_files()
    copied = generate.copied_sources()
    assert {"policy/release.py", "policy/kv_signal.py", "adapters/messager_step.py"} <= set(copied)
    assert sorted(files) == sorted([f"{PACKAGE_PATH}/__init__.py"] + [f"{PACKAGE_PATH}/{name}" for name in copied])
    for relative, path in copied.items():  # a license header, then our file byte for byte
        assert files[f"{PACKAGE_PATH}/{relative}"].endswith("\n" + path.read_text(encoding="utf-8"))
    for text in files.values():
        imported = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)
            for alias in node.names
        }
        assert imported <= set(sys.stdlib_module_names) | {"numpy"}, imported
    package = tmp_path / "generated_layer0_release"
    for relative, text in files.items():
        path = package / Path(relative).relative_to(PACKAGE_PATH)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        generated = importlib.import_module("generated_layer0_release.policy.release")
        parser = importlib.import_module("generated_layer0_release.policy.kv_signal")
        for module in (generated, release):
            policy = module.make_release("ordered")
            policy.add_signal([(0, 0, 4), (1, 0, 4)])
            policy.add_registration(module.Registration(1, "B", 4))
            released = policy.add_registration(module.Registration(0, "A", 8))
            assert released.batches == [((0, 4), (1, 4))]
        assert parser.parse_kv_signal([1, 0, 3, 4, 5]).signal.tasks == ((3, 4, 9),)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.startswith("generated_layer0_release")]:
            del sys.modules[name]


def test_generated_files_pass_fastdeploy_lint(tmp_path):
    (tmp_path / "fastdeploy").mkdir()  # so that isort sees fastdeploy as first party, as in a FastDeploy checkout
    (tmp_path / "fastdeploy" / "__init__.py").touch()
    paths = [str(path) for path in write_portable_files(tmp_path).values()]
    for tool in (("black", "--check", "-l", "119"), ("isort", "--check", "--profile", "black", "-l", "119")):
        result = run_tool(*tool, *paths, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    result = run_tool("flake8", "--max-line-length", "119", "--extend-ignore", "E203,W503", *paths)
    assert result.returncode == 0, result.stdout


def test_upstream_unit_tests_pass_in_a_patched_clone(patched):
    target = patched["release/2.6"].clone
    env = dict(os.environ, PYTHONPATH=str(target), FD_PD_FIX="0")
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_PATH]
    result = subprocess.run(pytest_command, cwd=target, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


# ---- the branch-specific edit ----


@pytest.mark.parametrize("base", list(BRANCHES))
def test_only_the_two_method_ranges_change(patched, source_repo, base):
    before = read_at(source_repo, base, TARGET_PATH)
    after = (patched[base].clone / TARGET_PATH).read_text(encoding="utf-8")
    cls = next(node for node in ast.parse(before).body if getattr(node, "name", "") == "CacheMessagerV1")
    consume = next(node for node in cls.body if getattr(node, "name", "") == "consume_signals")
    register = analyse_source(before).register
    loop = register.body[1] if isinstance(register.body[0], ast.Expr) else register.body[0]  # after a docstring
    changes = [
        opcode
        for opcode in difflib.SequenceMatcher(
            None, before.splitlines(True), after.splitlines(True), False
        ).get_opcodes()
        if opcode[0] != "equal"
    ]
    inserted_hooks = [change for change in changes if change[1] == change[2] == loop.lineno - 1]
    assert len(inserted_hooks) == 1
    hook = after.splitlines()[inserted_hooks[0][3] : inserted_hooks[0][4]]
    # it attaches the step before the registration loop reads anything
    assert [line.strip() for line in hook] == ["self._layer0_release_on_registration()"]
    for tag, first, last, _, _ in changes:
        if (first, last) != (loop.lineno - 1, loop.lineno - 1):
            assert consume.lineno - 1 <= first and last <= consume.end_lineno, (tag, first, last)
    engine_files = list(ENGINE_PATHS) if base == ENGINE_BRANCH else []  # the engine side, tested below
    assert git(patched[base].clone, "diff", "--name-only", "HEAD~1").split() == sorted(
        [TARGET_PATH, TEST_PATH, *generate.package_files(), *engine_files]
    )


@pytest.mark.parametrize("base", list(BRANCHES))
def test_patched_messager_keeps_the_branch_op_call_and_passes_lint(patched, base):
    variant = BRANCHES[base]
    path = patched[base].clone / TARGET_PATH
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == OP]
    expected = "self.rank_id, self.gpu_id, 1" if variant["op_args"] == 4 else "self.rank_id, 0"
    assert [", ".join(ast.unparse(arg) for arg in call.args[1:]) for call in calls] == [expected]
    for tool in (
        ("black", "--check", "-l", "119"),
        ("flake8", "--max-line-length", "119", "--extend-ignore", "E203,W503"),
    ):
        result = run_tool(*tool, str(path))
        assert result.returncode == 0, result.stdout + result.stderr


def test_commit_messages_follow_the_pr_template(patched):
    titles = {base: git(item.clone, "log", "-1", "--format=%s").strip() for base, item in patched.items()}
    assert titles["develop"] == message.TITLE
    assert titles["release/2.6"] == f"[Cherry-Pick]{message.TITLE} (#{UPSTREAM_PR})"
    assert titles["release/2.5"] == f"[Cherry-Pick]{message.TITLE} (#{message.UPSTREAM_PR_PLACEHOLDER})"
    assert any("placeholder" in note for note in patched["release/2.5"].result.notes)
    for item in patched.values():
        body = git(item.clone, "log", "-1", "--format=%B")
        positions = [
            body.index(section)
            for section in (
                "## Motivation",
                "## Modifications",
                "## Usage or Command",
                "## Accuracy Tests",
                "## Checklist",
            )
        ]
        assert positions == sorted(positions)
        assert "#8034" in body and "#7724" in body
        assert "lazily" in body
    assert "put_finished_add_cache_task_req and finish_add_cache_task_barrier (pre-#7724)" in git(
        patched["release/2.6"].clone, "log", "-1", "--format=%B"
    )


# ---- the patched stand-in, run ----


def test_control_unpatched_branch_still_hangs(scenario_runs):
    assert scenario_runs["control"].outcome == "hang", describe(scenario_runs["control"])


@pytest.mark.parametrize("base", list(BRANCHES))
@pytest.mark.parametrize("name", SCENARIOS)
def test_patched_branch_finishes_without_the_plugin(scenario_runs, base, name):
    result = scenario_runs[(base, name)]
    assert result.outcome == "finished", describe(result)
    assert result.same_batches_on_all_ranks(), describe(result)
    assert "fastdeploy_pd_fix: disabled by FD_PD_FIX=0" in result.logs[0]
    assert "layer0_release: queued batch #" in result.logs[0]  # the upstream patch's own log lines, not the plugin's
    assert "fastdeploy_pd_fix: queued batch" not in result.logs[0]


@pytest.mark.parametrize("base", list(BRANCHES))
def test_diagnose_reads_the_logs_of_a_patched_branch(scenario_runs, base):
    result = scenario_runs[(base, "s3")]
    code, report = diagnose(Path(result.workdir) / "log")
    assert code == 0, report
    assert report.startswith("none: the ranks' batch sequences agree (rank 0: 2 batches, rank 1: 2 batches)"), report


def test_plugin_stands_aside_on_a_patched_checkout(patched):
    target = patched["develop"].clone
    code = (
        "from fastdeploy.cache_manager import cache_messager\n"
        "from fastdeploy_pd_fix.analysis import analyse_class\n"
        "print(analyse_class(cache_messager.CacheMessagerV1).reason)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), FD_LOG_DIR=str(target / "log"))
    result = subprocess.run([sys.executable, "-c", code], cwd=target, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "already carries the rank-invariant release" in result.stdout


# ---- refusals ----


def test_running_twice_is_refused_as_already_fixed(tmp_path, capsys):
    repo = init_repo(tmp_path / "twice")
    commit_variant(repo, "develop", BRANCHES["develop"])
    out = tmp_path / "out"
    assert command.main(["--repo", str(repo), "--out", str(out)]) == 0
    assert f"committed on {command.DEFAULT_BRANCH} (from develop)" in capsys.readouterr().out
    branches = git(repo, "branch", "--list")
    assert command.main(["--repo", str(repo), "--out", str(out)]) == 1  # now based on the fixed branch
    assert "already imports layer0_release: this branch is already fixed" in capsys.readouterr().err
    assert git(repo, "branch", "--list") == branches
    assert len(list(out.glob("*.patch"))) == 1


def test_a_failing_commit_hook_leaves_the_checkout_as_it_was(tmp_path, capsys):
    repo = init_repo(tmp_path / "hooked")
    commit_variant(repo, "develop", BRANCHES["develop"])
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre-commit").write_text("#!/bin/sh\necho 'black would reformat' >&2\nexit 1\n", encoding="utf-8")
    (hooks / "pre-commit").chmod(0o755)
    git(repo, "config", "core.hooksPath", str(hooks))
    head = git(repo, "rev-parse", "HEAD")
    assert command.main(["--repo", str(repo), "--out", str(tmp_path / "out")]) == 1
    assert "nothing committed" in capsys.readouterr().err
    assert git(repo, "branch", "--list").split() == ["*", "develop"]
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert command.main(["--repo", str(repo), "--out", str(tmp_path / "out"), "--no-verify"]) == 0


def test_unrecognised_checkouts_are_refused(tmp_path, capsys):
    raw = init_repo(tmp_path / "raw")  # the stand-in as is: every method defined once per variant, conditionally
    (raw / "fastdeploy").mkdir()
    for source in (STANDIN_ROOT / "fastdeploy").rglob("*.py"):
        target = raw / "fastdeploy" / source.relative_to(STANDIN_ROOT / "fastdeploy")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    git(raw, "add", "-A")
    git(raw, "commit", "--quiet", "-m", "raw stand-in")
    assert command.main(["--repo", str(raw), "--out", str(tmp_path / "out")]) == 1
    assert "consume_signals is defined conditionally or more than once" in capsys.readouterr().err

    empty = init_repo(tmp_path / "empty")
    assert command.main(["--repo", str(empty), "--out", str(tmp_path / "out")]) == 1
    assert "has no fastdeploy/cache_manager/cache_messager.py" in capsys.readouterr().err
    assert git(empty, "branch", "--list").split() == ["*", "develop"]

    assert command.main(["--repo", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    assert "not a git checkout" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, reason",
    [
        (
            lambda text: text.replace(
                "self.idx_cache_task_dict[current_id] = task", "self.idx_cache_task_dict.update({current_id: task})"
            ),
            "found 0",
        ),
        (lambda text: text.replace("get_output_kv_signal(kv_signal_data, self.rank_id, 0)", "pass"), "found 0"),
        (lambda text: text.replace("class CacheMessagerV1:", "class CacheMessagerV2:"), "expected one class"),
        (
            lambda text: text.replace("def _recover_pending_layer0_signal", "def _layer0_release_on_registration"),
            "already has",
        ),
    ],
)
def test_unexpected_shapes_are_refused(edit, reason):
    source = render_cache_messager(
        (STANDIN_ROOT / "fastdeploy" / "cache_manager" / "cache_messager.py").read_text(encoding="utf-8"), "7872"
    )
    rewritable(source)  # the unedited render is accepted
    with pytest.raises(MakePatchError, match=reason):
        rewritable(edit(source))


def test_dirty_working_tree_is_refused(tmp_path, capsys):
    repo = init_repo(tmp_path / "dirty")
    commit_variant(repo, "develop", BRANCHES["develop"])
    path = repo / TARGET_PATH
    path.write_text(path.read_text(encoding="utf-8") + "\n# local edit\n", encoding="utf-8")
    assert command.main(["--repo", str(repo), "--out", str(tmp_path / "out")]) == 1
    assert "uncommitted changes" in capsys.readouterr().err
    assert "# local edit" in path.read_text(encoding="utf-8")


# ---- modes, portable part, series ----


def test_upstream_mode_wires_the_8034_policy(tmp_path):
    source = render_cache_messager(
        (STANDIN_ROOT / "fastdeploy" / "cache_manager" / "cache_messager.py").read_text(encoding="utf-8"), "8034"
    )
    patched_source, _ = patch_source(source, release.UPSTREAM)
    # both paths into the policy, kv signals and registrations, build the step with #8034's policy
    assert patched_source.count('messager_step.step_for(self, "upstream", logger)') == 2
    assert '"ordered"' not in patched_source
    path = tmp_path / "cache_messager.py"
    path.write_text(patched_source, encoding="utf-8")
    assert run_tool("black", "--check", "-l", "119", str(path)).returncode == 0


def normalise(patch_text: str):
    """A format-patch file without what changes on every run: commit hashes, dates, blob ids."""
    skipped = ("From ", "Date: ", "index ")
    return [line for line in patch_text.splitlines() if not line.startswith(skipped)]


def test_committed_portable_patch_is_up_to_date(tmp_path):
    committed = sorted((REPO_ROOT / "patches").glob("0001-*.patch"))
    assert len(committed) == 1, committed
    fresh = command.portable_patch(tmp_path)
    assert [path.name for path in fresh] == [committed[0].name]
    assert normalise(fresh[0].read_text(encoding="utf-8")) == normalise(
        committed[0].read_text(encoding="utf-8")
    ), "patches/ is stale: run `python -m fastdeploy_pd_fix.upstream.command --portable-only --out patches`"


def test_portable_patch_then_make_patch_gives_the_branch_specific_part_only(tmp_path):
    repo = init_repo(tmp_path / "series")
    commit_variant(repo, "release/2.6", BRANCHES["release/2.6"])
    committed = sorted((REPO_ROOT / "patches").glob("0001-*.patch"))
    git(repo, "am", "--quiet", "--keep-non-patch", str(committed[0]))
    assert git(repo, "log", "-1", "--format=%s").strip() == message.PORTABLE_TITLE
    result = command.make_patch(repo, out=tmp_path / "out", upstream_pr="9001")
    assert git(repo, "diff", "--name-only", "HEAD~1").split() == [TARGET_PATH]
    assert "already on this branch" in git(repo, "log", "-1", "--format=%B")
    assert len(result.patches) == 1


# ---- the engine side ----


@pytest.mark.parametrize("base", BRANCHES)
def test_the_engine_side_is_wired_where_the_branch_has_engine_files_it_recognises(patched, base):
    clone_dir, result = patched[base].clone, patched[base].result
    body = git(clone_dir, "log", "-1", "--format=%B")
    if base == ENGINE_BRANCH:
        expected = patch_engine(engine_model.fastdeploy_files())
        assert {path: (clone_dir / path).read_text(encoding="utf-8") for path in ENGINE_PATHS} == expected
        assert "ResourceManagerV1 puts the engine's slot-lifecycle notices" in body
        assert not [note for note in result.notes if "engine side" in note]
    else:
        assert not any((clone_dir / path).exists() for path in ENGINE_PATHS)
        assert f"engine side not wired: the base has no {RESOURCE_MANAGER_PATH}" in " ".join(result.notes)
        assert "The engine side is not wired on this branch (the base has no" in " ".join(body.split())
