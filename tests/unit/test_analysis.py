"""The one target analyser: rendered stand-in releases, real upstream files, live classes and refused shapes."""

import ast
import functools
import itertools
import sys
import types
from pathlib import Path

import pytest
from support.render import render_cache_messager

from fastdeploy_pd_fix import analysis, live_source
from fastdeploy_pd_fix.analysis import OpArgument, analyse_class, analyse_source
from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.standin.scenarios import RELEASES

STANDIN_SOURCE = (STANDIN_ROOT / "fastdeploy" / "cache_manager" / "cache_messager.py").read_text(encoding="utf-8")
#: The real upstream files: ``../shared/upstream`` beside the repository root (see its README).
UPSTREAM_FILES = Path(__file__).resolve().parents[2].parent / "shared" / "upstream"
needs_upstream = pytest.mark.skipif(
    not UPSTREAM_FILES.is_dir(), reason="no ../shared/upstream: the real upstream files are absent"
)
PRE_7872_PRE_7724 = (
    "no pending buffer (pre-#7872); finish_add_cache_task_barrier (pre-#7724); "
    "send loop does not wait for registration"
)
WITH_7724 = "no finish_add_cache_task_barrier (#7724+); send loop waits for registration (#7724+)"
#: Each real file: the op's argument sources and the end of its features line (None: no CacheMessagerV1).
UPSTREAM_OP_ARGUMENTS = {
    "cache_messager@PaddlePaddle_37363c28.py": (("self.rank_id", "0"), PRE_7872_PRE_7724),
    "cache_messager@RichardWooSJTU_0ceff838.py": (("self.rank_id", "1"), PRE_7872_PRE_7724),
    "cache_messager@liyonghua0910_5e520501.py": (("self.rank_id", "0"), PRE_7872_PRE_7724),
    "cache_messager@gongshaotian_4e7a46e4.py": (("self.rank_id", "1"), f"no pending buffer (pre-#7872); {WITH_7724}"),
    "cache_messager@gongshaotian_8a1e71d0.py": (
        ("self.rank_id", "1"),
        f"pending_layer0_signals (#7872+); {WITH_7724}",
    ),
    "cache_messager@Xreki_d0a82f18.py": None,
}
VARIANTS = [
    {"release": release, "with_7724": with_7724, "op_args": op_args}
    for release, with_7724, op_args in itertools.product(RELEASES, (False, True), (3, 4))
]


def rendered(**variant):
    return render_cache_messager(STANDIN_SOURCE, **variant)


def sources(result):
    return tuple(argument.source for argument in result.op_arguments)


# ---- files ----


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: f"{v['release']}-7724_{int(v['with_7724'])}-op{v['op_args']}"
)
def test_every_rendered_standin_release_is_recognised_with_its_features(variant):
    result = analyse_source(rendered(**variant))
    assert result.recognised, result.reason
    expected = ("self.rank_id", "self.gpu_id", "1") if variant["op_args"] == 4 else ("self.rank_id", "0")
    assert sources(result) == expected
    assert result.op_function == "get_output_kv_signal" and result.op_import_module is None
    assert result.has_pending_buffer == (variant["release"] != "pre7872")
    assert result.reports_finished_add == (not variant["with_7724"])
    assert [ast.unparse(store) for store in result.task_stores] == ["self.idx_cache_task_dict[current_id] = task"]
    assert {"logger", "paddle", "get_output_kv_signal"} <= result.module_names
    assert result.features().startswith(f"get_output_kv_signal(buf, {', '.join(expected)}); ")
    assert ("(#7724+)" in result.features()) == variant["with_7724"]
    assert ("(#7872+)" in result.features()) == (variant["release"] != "pre7872")
    # The #7724 send loop waits through a helper (_cache_task_to_send): followed through self-calls.
    assert result.waits_for_registration == variant["with_7724"]
    assert not result.waits_for_registration_via_storage_only


@needs_upstream
def test_real_upstream_files_are_recognised_with_their_op_arguments():
    files = sorted(UPSTREAM_FILES.glob("cache_messager@*.py"))
    assert {path.name for path in files} == set(UPSTREAM_OP_ARGUMENTS)
    for path in files:
        result = analyse_source(path.read_text(encoding="utf-8"))
        expected = UPSTREAM_OP_ARGUMENTS[path.name]
        if expected is None:  # FastDeploy 2.0: no CacheMessagerV1, nothing to patch
            assert not result.recognised and "expected one class CacheMessagerV1, found 0" in result.reason
            continue
        arguments, features = expected
        assert result.recognised, (path.name, result.reason)
        assert sources(result) == arguments, path.name
        assert len(result.task_stores) == 1, path.name
        assert not result.waits_for_registration_via_storage_only, path.name
        assert result.features().endswith(f"; {features}"), (path.name, result.features())


# ---- release features come from calls, not definitions (real files, edited in memory) ----

REAL_FILE = "cache_messager@PaddlePaddle_37363c28.py"
WAIT_METHOD = """\
def _maybe_wait_for_cache_task(self, engine_idx):
    return self.idx_cache_task_dict.get(engine_idx)

def _task_to_send(self, engine_idx):
    return self._maybe_wait_for_cache_task(engine_idx)

"""
#: What the send loop does first, per case: (statements, waits, waits only via storage).
SEND_LOOP_STARTS = {
    "defined, never called": ("pass", False, False),
    "called only under FD_PD_TRANSFER_VIA_STORAGE": (
        "if envs.FD_PD_TRANSFER_VIA_STORAGE:\n    self._maybe_wait_for_cache_task(0)",
        False,
        True,
    ),
    "called only in a storage ternary": (
        "x = self._maybe_wait_for_cache_task(0) if envs.FD_PD_TRANSFER_VIA_STORAGE else None",
        False,
        True,
    ),
    "called under `not` the switch": (
        "if not envs.FD_PD_TRANSFER_VIA_STORAGE:\n    self._maybe_wait_for_cache_task(0)",
        True,
        False,
    ),
    "called in the else of the switch": (
        "if envs.FD_PD_TRANSFER_VIA_STORAGE:\n    pass\nelse:\n    self._maybe_wait_for_cache_task(0)",
        True,
        False,
    ),
    "called unconditionally": ("self._maybe_wait_for_cache_task(0)", True, False),
    "called through a helper": ("self._task_to_send(0)", True, False),
    "called under another condition": ("if self.rank == 0:\n    self._maybe_wait_for_cache_task(0)", True, False),
}


def edit_real_method(source: str, name: str, before: str = "", start: str = "") -> str:
    """``source`` with ``before`` (class-level code) inserted above ``CacheMessagerV1.<name>`` and ``start``
    (statements) at the start of its body, each indented to fit."""
    cls = analysis.target_class_node(ast.parse(source))
    method = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == name)
    lines = source.splitlines(keepends=True)
    indent = " " * method.col_offset

    def indented(text, prefix):
        return "".join(f"{prefix}{line}\n" if line else "\n" for line in text.splitlines())

    body = method.body[0].lineno - 1
    lines[body:body] = [indented(start, indent + "    ")]
    lines[method.lineno - 1 : method.lineno - 1] = [indented(before, indent)]
    return "".join(lines)


@needs_upstream
@pytest.mark.parametrize("case", SEND_LOOP_STARTS)
def test_the_send_loop_waits_for_registration_only_where_it_calls_the_wait(case):
    start, waits, storage_only = SEND_LOOP_STARTS[case]
    source = (UPSTREAM_FILES / REAL_FILE).read_text(encoding="utf-8")
    assert analysis.REGISTRATION_WAIT not in source  # pre-#7724: the case is built on the real file
    edited = edit_real_method(source, analysis.SEND_LOOP, before=WAIT_METHOD, start=start)
    result = analyse_source(edited)
    assert result.recognised, result.reason
    assert (result.waits_for_registration, result.waits_for_registration_via_storage_only) == (waits, storage_only)
    features = result.features()
    assert ("send loop waits for registration (#7724+)" in features) == waits, features
    assert ("only via storage (FD_PD_TRANSFER_VIA_STORAGE)" in features) == storage_only, features
    assert features.endswith("send loop does not wait for registration") == (not waits and not storage_only)


@needs_upstream
@pytest.mark.parametrize(
    "old, new, reports",
    [
        (None, None, True),
        ("self.engine_worker_queue.finish_add_cache_task_barrier.wait()", "pass", False),
        (
            "self.engine_worker_queue.finish_add_cache_task_barrier.wait()",
            "barrier = self.engine_worker_queue.finish_add_cache_task_barrier",
            False,  # named, never waited at
        ),
        (
            "self.engine_worker_queue.finish_add_cache_task_barrier.wait()",
            "if envs.FD_PD_TRANSFER_VIA_STORAGE: self.engine_worker_queue.finish_add_cache_task_barrier.wait()",
            False,
        ),
        (
            "self.engine_worker_queue.finish_add_cache_task_barrier.wait()",
            "self._finish_add()",
            True,  # through a helper of the class
        ),
    ],
)
def test_the_registration_barrier_counts_where_the_registration_loop_waits_at_it(old, new, reports):
    source = (UPSTREAM_FILES / REAL_FILE).read_text(encoding="utf-8")
    helper = "def _finish_add(self):\n    self.engine_worker_queue.finish_add_cache_task_barrier.wait()\n\n"
    source = edit_real_method(source, "_add_cache_task_thread", before=helper)
    if old is not None:
        cls = analysis.target_class_node(ast.parse(source))
        register = next(node for node in cls.body if getattr(node, "name", None) == "_add_cache_task_thread")
        lines = source.splitlines(keepends=True)
        index = next(
            number for number in range(register.lineno, register.end_lineno) if old in lines[number]
        )  # the loop's own wait, not the helper's
        lines[index] = lines[index].replace(old, new)
        source = "".join(lines)
    result = analyse_source(source)
    assert result.recognised, result.reason
    assert result.reports_finished_add == reports
    assert ("finish_add_cache_task_barrier (pre-#7724)" in result.features()) == reports


def test_the_raw_standin_defines_its_methods_conditionally():
    assert "consume_signals is defined conditionally or more than once" in analyse_source(STANDIN_SOURCE).reason


@pytest.mark.parametrize(
    "old, new, reason",
    [
        (
            "self.idx_cache_task_dict[current_id] = task",
            "self.idx_cache_task_dict.update({current_id: task})",
            "found 0",
        ),
        ("get_output_kv_signal(kv_signal_data, self.rank_id, 0)", "pass", "found 0"),
        (
            "get_output_kv_signal(kv_signal_data, self.rank_id, 0)",
            "get_output_kv_signal(kv_signal_data, self.rank_id, 0); get_output_kv_signal(kv_signal_data, 1, 1)",
            "found 2",
        ),
        (
            "get_output_kv_signal(kv_signal_data, self.rank_id, 0)",
            "get_output_kv_signal(kv_signal_data, device_id, 0)",
            "unexpected get_output_kv_signal call",
        ),
        (
            "get_output_kv_signal(kv_signal_data, self.rank_id, 0)",
            "get_output_kv_signal(kv_signal_data, self.rank_id, wait_flag=0)",
            "unexpected get_output_kv_signal call",
        ),
        ("class CacheMessagerV1:", "class CacheMessagerV2:", "expected one class"),
        ("def _add_cache_task_thread(self):", "def _add_cache_task(self):", "missing methods _add_cache_task_thread"),
        ("import paddle\n", "import paddle\nfrom fastdeploy.cache_manager import layer0_release\n", "already carries"),
        (
            "self.cache_prefilled_engine_ids_queue",
            "self.prefilled_queue",
            "does not use cache_prefilled_engine_ids_queue",
        ),
        ("    def consume_signals(self):", "    async def consume_signals(self):", "consume_signals is async"),
    ],
)
def test_unexpected_shapes_are_not_recognised(old, new, reason):
    source = rendered(release="7872")
    assert analyse_source(source).recognised
    assert old in source
    result = analyse_source(source.replace(old, new))
    assert not result.recognised and reason in result.reason, result.reason
    assert result.already_fixed == (reason == "already carries")
    assert result.features() == "unrecognised"


@pytest.mark.parametrize("source", ["", "def (:", "class CacheMessagerV1:\n    x = 1\n", "\0", "x = '\\N{nope}'"])
def test_analyse_source_never_raises(source):
    assert not analyse_source(source).recognised


# ---- op arguments ----


class Device:
    rank_id = 3
    nested = type("Nested", (), {"device": 5})()


@pytest.mark.parametrize(
    "source, value", [("self.rank_id", 3), ("self.nested.device", 5), ("0", 0), ("-1", -1), ("-self.rank_id", -3)]
)
def test_op_arguments_evaluate_constants_and_self_chains(source, value):
    assert OpArgument(source).evaluate(Device()) == value


@pytest.mark.parametrize("source", ["rank_id", "self.rank()", "1 + 2", "__import__('os')", "self[0]", "(", "(1).real"])
def test_op_arguments_refuse_everything_else(source):
    with pytest.raises(ValueError):
        OpArgument(source).evaluate(Device())


# ---- live classes ----


def get_output_kv_signal(buffer, *args):
    pass


class Registering:
    def __init__(self):
        self.idx_cache_task_dict = {}

    def _add_cache_task_thread(self):
        self.idx_cache_task_dict[0] = {}


class ThreeArgs(Registering):
    def consume_signals(self):
        get_output_kv_signal(None, self.rank_id, 0)


VARIANT = 4


class Conditional(Registering):
    """Defines its methods inside class-body ``if`` blocks, as the stand-in does: the running one is analysed."""

    if VARIANT == 3:

        def consume_signals(self):
            get_output_kv_signal(None, self.rank_id, 0)

    else:

        def __init__(self):
            super().__init__()
            self.pending_layer0_signals = {}

        def consume_signals(self):
            from fastdeploy_pd_fix.standin.fastdeploy.model_executor.ops.gpu import get_output_kv_signal

            get_output_kv_signal(None, self.rank_id, self.gpu_id, 1)

        def _add_cache_task_thread(self):
            self.idx_cache_task_dict[0] = {}
            self.engine_worker_queue.finish_add_cache_task_barrier.wait()


def test_a_live_class_is_analysed_by_the_methods_it_runs():
    three = analyse_class(ThreeArgs)
    assert three.recognised and sources(three) == ("self.rank_id", "0")
    assert not three.has_pending_buffer and not three.reports_finished_add
    conditional = analyse_class(Conditional)
    assert conditional.recognised, conditional.reason
    assert sources(conditional) == ("self.rank_id", "self.gpu_id", "1")
    assert conditional.op_import_module == "fastdeploy_pd_fix.standin.fastdeploy.model_executor.ops.gpu"
    assert conditional.has_pending_buffer and conditional.reports_finished_add
    assert conditional.consume.lineno == Conditional.consume_signals.__code__.co_firstlineno


def test_a_wrapped_method_is_analysed_through_its_wrapper():
    class Wrapped(ThreeArgs):
        @functools.wraps(ThreeArgs.consume_signals)
        def consume_signals(self):
            pass

    assert analyse_class(Wrapped).op_arguments == analyse_class(ThreeArgs).op_arguments


def test_source_on_disk_that_no_longer_matches_the_running_code_is_not_trusted(monkeypatch):
    # A file replaced on disk after the module was compiled (an upgrade under a running process) shifts lines.
    real_source = live_source.inspect.getsource(sys.modules[__name__])
    monkeypatch.setattr(live_source.inspect, "getsource", lambda module: "\n" + real_source)
    result = analyse_class(ThreeArgs)
    assert not result.recognised and "does not match the running code" in result.reason


def generated_function():
    """A function compiled from a string: no file holds its source."""
    code = compile("def consume_signals(self):\n    pass\n", "<generated>", "exec")
    return types.FunctionType(next(const for const in code.co_consts if isinstance(const, types.CodeType)), {})


@pytest.mark.parametrize(
    "cls, reason",
    [
        (type("NoMethods", (), {}), "missing methods consume_signals, _add_cache_task_thread"),
        (type("BuiltinInit", (ThreeArgs,), {"__init__": object.__init__}), "not readable"),
        (type("Generated", (ThreeArgs,), {"consume_signals": generated_function()}), "not readable"),
    ],
)
def test_live_classes_without_usable_source_are_not_recognised(cls, reason):
    result = analyse_class(cls)
    assert not result.recognised and reason in result.reason, result.reason


def test_analyse_class_never_raises():
    class Hostile(ThreeArgs):
        def __getattribute__(self, name):
            raise RuntimeError("no")

    assert analyse_class(Hostile).recognised  # class attributes, not instance ones
    assert not analyse_class(42).recognised


class Env:
    FD_PD_TRANSFER_VIA_STORAGE = False


envs = Env()


class WaitsOnlyViaStorage(ThreeArgs):
    """#7724 shape in a release that waits for the registration only on the storage transfer path."""

    def prefill_layerwise_send_cache_thread(self):
        if envs.FD_PD_TRANSFER_VIA_STORAGE:
            self._maybe_wait_for_cache_task(0)

    def _maybe_wait_for_cache_task(self, slot):
        pass


class WaitsThroughAHelper(WaitsOnlyViaStorage):
    def prefill_layerwise_send_cache_thread(self):
        self._task(0)

    def _task(self, slot):
        return self._maybe_wait_for_cache_task(slot)


def test_a_live_class_waits_for_registration_by_the_calls_its_running_send_loop_makes():
    storage = analyse_class(WaitsOnlyViaStorage)
    assert (
        storage.recognised and not storage.waits_for_registration and storage.waits_for_registration_via_storage_only
    )
    assert "send loop waits for registration (#7724+)" not in storage.features()
    helper = analyse_class(WaitsThroughAHelper)
    assert helper.waits_for_registration and "send loop waits for registration (#7724+)" in helper.features()
    assert not analyse_class(ThreeArgs).waits_for_registration  # no send loop at all
