"""What preflight derives from a release's own syntax tree, on releases written here that it has never seen."""

import ast
import sys
import textwrap

import pytest

from fastdeploy_pd_fix.target import SCRIPT_PATH
from fastdeploy_pd_fix.tools import preflight, preflight_tree

UNSEEN_RELEASE = textwrap.dedent(
    """
    import argparse
    import json

    import paddle
    import not_installed_vendor_lib

    from fastdeploy.brand_new.transfer import NewCommManager
    from fastdeploy.model_executor.ops.xpu import get_output_kv_signal as read_signal
    from .local_helpers import helper
    from .. import envs
    import fastdeploy.inter_communicator.zmq_queue as zq


    def parse_args():
        parser = argparse.ArgumentParser("Cache Messager")
        parser.add_argument("--splitwise_role", type=str, default="mixed", choices=["mixed", "prefill", "decode"])
        parser.add_argument("--rank", type=int, default=0)
        parser.add_argument("--mp_num", type=int, default=1)
        parser.add_argument("--engine_worker_queue_port", type=int, required=True)
        parser.add_argument("--protocol", type=str, default="ipc", choices=["ipc"])
        parser.add_argument("--new_mode", type=str, required=True, choices=["fast", "slow"])
        parser.add_argument("--new_count", type=int, required=True)
        parser.add_argument("--new_ratio", type=float, required=True)
        parser.add_argument("--new_config", type=json.loads, required=True)
        parser.add_argument("--new_flag", action="store_true", required=True)
        parser.add_argument("--with-dashes", dest="renamed", required=True, default="x")
        parser.add_argument("--optional_unknown", type=int, default=3)
        return parser.parse_args()


    def consume_signals():
        from fastdeploy.cache_manager.ops_v3 import late_op
    """
)


def test_imports_are_read_from_the_whole_file_including_relative_and_local_ones():
    fastdeploy, others = preflight_tree.imported_modules(ast.parse(UNSEEN_RELEASE))
    assert fastdeploy == {
        "fastdeploy.brand_new.transfer": ["NewCommManager"],
        "fastdeploy.model_executor.ops.xpu": ["get_output_kv_signal"],
        "fastdeploy.cache_manager.local_helpers": ["helper"],
        "fastdeploy": ["envs"],
        "fastdeploy.inter_communicator.zmq_queue": [],
        "fastdeploy.cache_manager.ops_v3": ["late_op"],
    }
    assert others == ["argparse", "json", "paddle", "not_installed_vendor_lib"]


def test_command_line_sets_known_options_and_gives_every_required_one_a_plausible_value():
    options = preflight_tree.parser_options(ast.parse(UNSEEN_RELEASE))
    arguments = preflight_tree.command_line(options, rank=1, nranks=2, port=4242, num_layers=1)
    pairs = {flag: value for flag, value in zip(arguments, arguments[1:] + [""]) if flag.startswith("--")}
    assert pairs["--splitwise_role"] == "prefill" and pairs["--rank"] == "1" and pairs["--mp_num"] == "2"
    assert pairs["--engine_worker_queue_port"] == "4242"
    assert pairs["--protocol"] == "ipc", "a known value outside the option's choices falls back to its first choice"
    assert "--new_flag" in arguments and arguments[arguments.index("--new_flag") + 1].startswith("--")
    assert [pairs[flag] for flag in ("--new_mode", "--new_count", "--new_ratio", "--new_config", "--with-dashes")] == [
        "fast",
        "1",
        "1.0",
        "{}",
        "x",
    ]
    assert "--optional_unknown" not in arguments, "an option neither known nor required keeps its default"


def test_the_command_line_parses_with_the_release_own_parser(monkeypatch):
    tree = ast.parse(UNSEEN_RELEASE)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "parse_args")
    namespace = {}
    exec(compile("import argparse\nimport json\n" + ast.unparse(function), "<parse_args>", "exec"), namespace)
    arguments = preflight_tree.command_line(preflight_tree.parser_options(tree), 0, 2, 4242, 1)
    monkeypatch.setattr(sys, "argv", ["cache_messager.py", *arguments])
    args = namespace["parse_args"]()
    assert (args.splitwise_role, args.engine_worker_queue_port, args.new_flag, args.new_config, args.renamed) == (
        "prefill",
        4242,
        True,
        {},
        "x",
    )


def test_build_tree_copies_the_file_unmodified_and_stubs_every_imported_module(tmp_path):
    source = tmp_path / "cache_messager.py"
    source.write_bytes(UNSEEN_RELEASE.encode() + b"# trailing bytes \xc3\xa9\r\n")
    tree = preflight_tree.build_tree(source, tmp_path / "tree", "9.9")
    assert (tmp_path / "tree" / SCRIPT_PATH).read_bytes() == source.read_bytes()
    for module in (
        "fastdeploy.brand_new.transfer",
        "fastdeploy.model_executor.ops.xpu",
        "fastdeploy.cache_manager.ops_v3",
    ):
        assert (tmp_path / "tree" / module.replace(".", "/") / "__init__.py").is_file()
    assert "fastdeploy.cache_manager.local_helpers" in tree.stubbed_modules
    assert tree.missing_third_party == ["not_installed_vendor_lib"]
    assert "__version__ = '9.9'" in (tmp_path / "tree" / "fastdeploy" / "__init__.py").read_text()
    assert (tmp_path / "tree" / "fastdeploy" / "pd_fix_standin" / "script.py").is_file()
    assert (tmp_path / "tree" / "fastdeploy" / "_preflight" / "engine.py").is_file()


def test_installed_fastdeploy_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "fastdeploy"
    (package / "cache_manager").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('FastDeploy must not be imported')\n")
    (package / "cache_manager" / "cache_messager.py").write_text("# release\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fastdeploy", raising=False)
    assert preflight.installed_cache_messager() == package / "cache_manager" / "cache_messager.py"
    assert "fastdeploy" not in sys.modules
    assert preflight.locate_source(str(tmp_path)) == (package / "cache_manager" / "cache_messager.py").resolve()


def test_without_fastdeploy_and_without_source_there_is_nothing_to_check(monkeypatch):
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    report = preflight.preflight(None, progress=lambda line: None)
    assert report["exit_code"] == preflight.EXIT_USAGE
    assert "FastDeploy is not installed in this environment: pass --source" in report["verdict"]


def test_a_file_without_cache_messager_v1_stands_aside_without_running(tmp_path):
    source = tmp_path / "cache_messager.py"
    source.write_text("class CacheMessager:\n    pass\n")
    report = preflight.preflight(str(source), progress=pytest.fail)
    assert report["exit_code"] == preflight.EXIT_STANDS_ASIDE
    assert report["verdict"].startswith("PLUGIN STANDS ASIDE: expected one class CacheMessagerV1, found 0")
