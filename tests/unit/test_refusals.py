"""Exit codes mean one thing: a command that cannot do its work says so in one line on stderr and exits 2, before
any work starts (no tree, no rank process, no run of the explorer, no commit), never with a traceback.

Each row runs the tool's ``main(argv)`` in this process with its work replaced by :func:`work_started`, so a
refusal that comes only once the work started (or never comes) fails the row.
"""

import importlib.util
from pathlib import Path

import pytest
from support.upstream_files import UPSTREAM_FILES, needs_upstream

from fastdeploy_pd_fix import cli
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS
from fastdeploy_pd_fix.target import SCRIPT_PATH
from fastdeploy_pd_fix.tools import preflight
from fastdeploy_pd_fix.upstream import command as make_patch_command
from fastdeploy_pd_fix.verify import command as verify_command

REPOSITORY = Path(__file__).resolve().parents[2]
#: A release file preflight accepts: the stand-in's, shipped with the package.
RELEASE = STANDIN_ROOT / SCRIPT_PATH


def work_started(*args, **kwargs):
    pytest.fail("the command started its work instead of refusing")


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: read-only by its mode, or for root (whom modes do not stop)
    ``/sys``; skipped where neither refuses."""
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    refusing = None
    for folder in (read_only, Path("/sys")):
        try:
            (folder / "probe").touch()
        except OSError:
            refusing = folder
            break
        (folder / "probe").unlink()
    if refusing is None:
        pytest.skip("no folder here refuses writes")
    yield refusing
    read_only.chmod(0o700)


def refusal(main, argv, capsys) -> str:
    """``main(argv)`` must exit 2 with one line on stderr and nothing on stdout: that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == cli.EXIT_USAGE == preflight.EXIT_USAGE, err
    assert out == "" and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# ---- preflight: each row gives (arguments, what the line must name, what it must say) ----


def kept_by_a_previous_run(tmp_path, request):
    (tmp_path / "kept" / "tree").mkdir(parents=True)
    return ["--keep", str(tmp_path / "kept")], "--keep", "in use"


def keep_onto_a_file(tmp_path, request):
    (tmp_path / "a-file").write_text("mine\n")
    return ["--keep", str(tmp_path / "a-file")], "--keep", "is not a folder"


def keep_where_nothing_can_be_written(tmp_path, request):
    folder = request.getfixturevalue("unwritable")
    return ["--keep", str(folder / "kept")], "--keep", f"cannot write in {folder}"


def source_is_markdown(tmp_path, request):
    readme = REPOSITORY / "README.md"
    return ["--source", str(readme)], str(readme), "not a FastDeploy cache_messager.py (not Python: "


def source_is_empty(tmp_path, request):
    (tmp_path / "empty.py").write_text("")
    return ["--source", str(tmp_path / "empty.py")], "empty.py", "not a FastDeploy cache_messager.py"


def source_is_unrelated_python(tmp_path, request):
    (tmp_path / "tool.py").write_text("class Messager:\n    pass\n")
    return ["--source", str(tmp_path / "tool.py")], "tool.py", "not a FastDeploy cache_messager.py"


def source_is_missing(tmp_path, request):
    return ["--source", str(tmp_path / "nowhere.py")], "nowhere.py", "no such file or directory"


def only_the_no_race_scenario(tmp_path, request):
    return ["--scenarios", "s0"], "s0", "no race scenario selected"


def no_scenario(tmp_path, request):
    return ["--scenarios", ""], "--scenarios ''", "names no scenario"


def unknown_scenario(tmp_path, request):
    return ["--scenarios", "s1,s9"], "unknown s9", f"known: {', '.join(SCENARIOS)}"


def no_parallel_run(tmp_path, request):
    return ["--parallel", "0"], "--parallel", "not a positive integer"


def negative_parallel_runs(tmp_path, request):
    return ["--parallel", "-2"], "--parallel", "not a positive integer"


def zero_deadline(tmp_path, request):
    return ["--deadline", "0"], "--deadline", "not a positive number of seconds"


def negative_deadline(tmp_path, request):
    return ["--deadline", "-1"], "--deadline", "not a positive number of seconds"


PREFLIGHT_ROWS = [
    kept_by_a_previous_run,
    keep_onto_a_file,
    keep_where_nothing_can_be_written,
    source_is_markdown,
    source_is_empty,
    source_is_unrelated_python,
    source_is_missing,
    only_the_no_race_scenario,
    no_scenario,
    unknown_scenario,
    no_parallel_run,
    negative_parallel_runs,
    zero_deadline,
    negative_deadline,
]


@pytest.mark.parametrize("row", PREFLIGHT_ROWS, ids=lambda row: row.__name__)
def test_preflight_refuses_in_one_line_before_any_work(row, tmp_path, request, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "preflight", work_started)
    arguments, names, says = row(tmp_path, request)
    before = sorted(tmp_path.rglob("*"))
    line = refusal(preflight.main, ["--source", str(RELEASE), "--scenarios", "s1", *arguments], capsys)
    assert line.startswith("fastdeploy-pd-fix preflight: error: ") and names in line and says in line, line
    assert sorted(tmp_path.rglob("*")) == before, "nothing is created, not even the kept folder"


@pytest.mark.skipif(importlib.util.find_spec("paddle") is None, reason="preflight runs only where paddle is")
def test_preflight_takes_a_race_selection_and_a_new_or_empty_kept_folder(tmp_path, capsys, monkeypatch):
    """The other side of the rows above: valid arguments reach the work (so their stub is the one that runs)."""
    calls = []
    monkeypatch.setattr(preflight, "preflight", lambda *args, **kwargs: calls.append(args) or {"exit_code": 0})
    (tmp_path / "empty").mkdir()
    for keep in (tmp_path / "empty", tmp_path / "new" / "kept"):
        argv = ["--source", str(RELEASE), "--scenarios", "s0,l2", "--parallel", "1", "--keep", str(keep), "--json"]
        assert preflight.main(argv) == 0, capsys.readouterr().err
    assert [call[1] for call in calls] == [("s0", "l2")] * 2


@needs_upstream
@pytest.mark.parametrize("path", UPSTREAM_FILES, ids=lambda path: path.name)
def test_every_real_cache_messager_file_is_one(path):
    """Including FastDeploy 2.0's, which has no CacheMessagerV1: preflight goes on and says the plugin stands aside."""
    preflight.check_messager_file(path)


def test_a_file_that_is_not_utf8_is_not_a_cache_messager(tmp_path):
    (tmp_path / "cache_messager.py").write_bytes(b"class CacheMessager:\n    name = '\xff'\n")
    with pytest.raises(preflight.PreflightError, match="not a FastDeploy cache_messager.py \\(not Python: "):
        preflight.check_messager_file(tmp_path / "cache_messager.py")


# ---- verify and make-patch: the output is checked before the run, not after it ----


@pytest.mark.parametrize("where", ["a folder", "no such folder", "unwritable"])
def test_verify_refuses_a_json_path_it_could_not_write_before_running(where, tmp_path, request, capsys, monkeypatch):
    monkeypatch.setattr(verify_command, "explore", work_started)
    if where == "a folder":
        path, says = tmp_path, "is a folder, not a file"
    elif where == "no such folder":
        path, says = tmp_path / "missing" / "out.json", "no such directory"
    else:
        path, says = request.getfixturevalue("unwritable") / "out.json", "cannot write in"
    line = refusal(cli.main, ["verify", "--quick", "--json-out", str(path)], capsys)
    assert line.startswith("fastdeploy-pd-fix verify: error: argument --json-out: ") and says in line, line


@pytest.mark.parametrize("portable_only", [True, False], ids=["portable-only", "repo"])
@pytest.mark.parametrize("where", ["a file", "unwritable"])
def test_make_patch_refuses_an_out_it_could_not_write_before_committing(
    where, portable_only, tmp_path, request, capsys, monkeypatch
):
    monkeypatch.setattr(make_patch_command, "make_patch", work_started)
    monkeypatch.setattr(make_patch_command, "portable_patch", work_started)
    if where == "a file":
        out, says = tmp_path / "patches", "is not a folder"
        out.write_text("not a folder\n")
    else:
        out, says = request.getfixturevalue("unwritable") / "patches", "cannot write in"
    argv = ["make-patch", "--out", str(out)] + (["--portable-only"] if portable_only else ["--repo", str(tmp_path)])
    line = refusal(cli.main, argv, capsys)
    assert line.startswith("fastdeploy-pd-fix make-patch: error: argument --out: ") and says in line, line
