"""The branch-specific part: ``CacheMessagerV1`` of one branch's ``cache_messager.py``, rewritten by line range.

``consume_signals`` is replaced by a loop over the copied package (``layer0_release.adapters.messager_step``: the
per-signal step, the release, the batch journal) that reads each kv signal with the branch's own op call, followed by
one small method, ``_layer0_release_on_registration``, which attaches the step (``MessagerStep.attach``:
``idx_cache_task_dict`` becomes a ``BoundTaskDict``, which reports every store itself, and engine notices are taken out
of ``get_cache_info`` results); one line calling it is inserted as the first statement of ``_add_cache_task_thread``,
before its loop reads anything. Every other byte of the file stays as it is, so each branch keeps its own
engine-facing calls (``get_cache_info``, barriers, the pre-#7724 ``finish_add_cache_task`` report and barrier).

The target is read by :func:`fastdeploy_pd_fix.analysis.analyse_source`, the analyser the plugin uses too; what only a
rewrite needs (one task store, the loop alone on its first line, a module-level ``logger``, the op's name resolvable,
the new names free) is checked here on top.
"""

from __future__ import annotations

import ast
import re
from string import Template
from typing import List, Tuple

from fastdeploy_pd_fix.adapters.messager_step import STEP_ATTRIBUTE
from fastdeploy_pd_fix.analysis import TargetAnalysis, analyse_source, bound_names, class_defines, target_class_node
from fastdeploy_pd_fix.policy import release
from fastdeploy_pd_fix.target import TARGET_CLASS, UPSTREAMED_PACKAGE
from fastdeploy_pd_fix.upstream import TARGET_PATH, MakePatchError

#: The method the patch adds to ``CacheMessagerV1``; a class that already has it (or the step attribute) is refused.
REGISTRATION_METHOD = "_layer0_release_on_registration"
#: The name of the kv signal buffer in the new ``consume_signals``.
BUFFER = "kv_signal_data"

METHODS = Template(
    '''\
def consume_signals(self):
    """Read kv signals and hand each to the rank-invariant layer-0 release (fastdeploy/cache_manager/layer0_release).

    Every TP rank sees the same kv signals and registrations, each rank in its own interleaving. The release makes
    the batches put into cache_prefilled_engine_ids_queue a function of those two streams alone, so that every rank
    waits on the send barriers in the same order. Each queued batch is logged with a fingerprint of the sequence so
    far (`layer0_release: queued batch #N [...] seq_hash=H`), equal on every rank.
    """
${imports}    from fastdeploy.cache_manager.layer0_release.adapters import messager_step
    from fastdeploy.cache_manager.layer0_release.policy import kv_signal

    paddle.device.set_device("cpu")
    ${buffer} = paddle.full([kv_signal.KV_SIGNAL_LENGTH], -1, dtype="int32")

    def read_signal():
        ${op_call}
        return ${buffer}.numpy()

    messager_step.consume_signals_forever(messager_step.step_for(self, "${mode}", logger), read_signal)

def ${registration_method}(self):
    """Attach the layer-0 release to this messager before the registration loop reads anything (idempotent).

    idx_cache_task_dict becomes a layer0_release BoundTaskDict: every store reports itself to the release, and the
    send thread reads, for each slot of the batch it took from cache_prefilled_engine_ids_queue, the task that
    batch was bound to (an aborted request's batch may still be queued when its slot's next request is stored).
    Engine notices (an abort, a request computed without transfer) are taken out of get_cache_info results and
    handed to the release. It runs in the registration thread, the only one that stores, so that no store goes
    into the dict being replaced.
    """
    from fastdeploy.cache_manager.layer0_release.adapters import messager_step

    messager_step.step_for(self, "${mode}", logger).attach()
'''
)


def split_lines(text: str) -> List[str]:
    """Lines with their ``\\n`` kept, split exactly where the syntax tree counts lines."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def alone_on_its_lines(lines: List[str], node: ast.stmt) -> bool:
    before = lines[node.lineno - 1][: node.col_offset]
    after = lines[node.end_lineno - 1][node.end_col_offset :].strip()
    return not before.strip() and (not after or after.startswith("#"))


def rewritable(source: str) -> Tuple[TargetAnalysis, ast.Assign]:
    """The analysis of ``source`` and its task store, or :class:`MakePatchError` saying why it cannot be rewritten."""
    analysis = analyse_source(source)
    if analysis.already_fixed:
        raise MakePatchError(f"{TARGET_PATH} already imports {UPSTREAMED_PACKAGE}: this branch is already fixed")
    if not analysis.recognised:
        raise MakePatchError(f"{TARGET_PATH}: {analysis.reason}; this checkout is not recognised")
    lines = split_lines(source)
    if len(analysis.task_stores) != 1:
        raise MakePatchError(
            "expected one `self.idx_cache_task_dict[...] = ...` statement in _add_cache_task_thread, "
            f"found {len(analysis.task_stores)}; this checkout is not recognised"
        )
    store = analysis.task_stores[0]
    if len(store.targets) != 1:
        raise MakePatchError(f"unexpected task store `{ast.unparse(store)}`; this checkout is not recognised")
    first = first_statement(analysis.register)
    if not alone_on_its_lines(lines, first):
        raise MakePatchError("the first statement of _add_cache_task_thread shares its line with other code")
    cls = target_class_node(ast.parse(source))
    attributes = {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute)}
    taken = {name for name in (REGISTRATION_METHOD, STEP_ATTRIBUTE) if name in attributes}
    taken |= {REGISTRATION_METHOD} if class_defines(cls, REGISTRATION_METHOD) else set()
    if taken:
        raise MakePatchError(f"{TARGET_CLASS} already has {', '.join(sorted(taken))}; refusing to overwrite")
    op_root = analysis.op_function.split(".")[0]
    if op_root not in analysis.module_names | bound_names(analysis.local_imports):
        raise MakePatchError(f"cannot tell where {op_root} comes from in {TARGET_PATH}")
    if "logger" not in analysis.module_names:
        raise MakePatchError(f"{TARGET_PATH} has no module-level `logger`")
    return analysis, store


def first_statement(function: ast.FunctionDef) -> ast.stmt:
    """The first statement of ``function`` after its docstring (the loop, in every release)."""
    body = function.body
    docstring = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
    return body[1] if docstring and len(body) > 1 else body[0]


def _indent(text: str, prefix: str, newline: str) -> List[str]:
    return [(prefix + line if line.strip() else "") + newline for line in text.split("\n")]


def patch_source(source: str, mode: str = release.ORDERED) -> Tuple[str, TargetAnalysis]:
    """``cache_messager.py`` with the two edits, and its analysis. Other lines are left byte-identical."""
    if mode not in release.RELEASE_MODES:
        raise MakePatchError(f"unknown mode {mode!r}; expected one of {', '.join(release.RELEASE_MODES)}")
    analysis, store = rewritable(source)
    consume = analysis.consume
    lines = split_lines(source)
    def_line = lines[consume.lineno - 1]
    newline = "\r\n" if def_line.endswith("\r\n") else "\n"
    imports = [ast.unparse(node) for node in analysis.local_imports]
    imports += [] if "paddle" in analysis.module_names else ["import paddle"]
    methods = METHODS.substitute(
        imports="".join(f"    {statement}\n" for statement in imports),
        buffer=BUFFER,
        op_call=analysis.op_call(BUFFER, analysis.op_function),
        mode=mode,
        registration_method=REGISTRATION_METHOD,
    )
    replacement = _indent(methods.rstrip("\n"), def_line[: consume.col_offset], newline)
    first = first_statement(analysis.register)
    hook = f"{lines[first.lineno - 1][: first.col_offset]}self.{REGISTRATION_METHOD}(){newline}"
    edits = [  # (first line, last line, new lines), applied bottom-up so that line numbers stay valid
        (consume.lineno, consume.end_lineno, replacement),
        (first.lineno, first.lineno - 1, [hook]),
    ]
    for first, last, new_lines in sorted(edits, key=lambda edit: edit[0], reverse=True):
        lines[first - 1 : last] = new_lines
    patched = "".join(lines)
    ast.parse(patched)  # never write a file that does not parse
    return patched, analysis
