"""``fastdeploy-pd-fix make-patch``: the fix as a commit in a FastDeploy checkout, and as ``git format-patch`` files.

    fastdeploy-pd-fix make-patch --repo ~/FastDeploy [--base release/2.6] [--mode ordered] [--out pd-fix-patches]
    fastdeploy-pd-fix make-patch --portable-only --out patches      # the branch-independent part, in a scratch repo

The commit (on a new branch, ``pd-fix/layer0-release`` by default, from ``--base``) holds:

* ``fastdeploy/cache_manager/layer0_release.py``: the release policy and the kv-signal parser, generated from this
  package's :mod:`fastdeploy_pd_fix.release` and :mod:`fastdeploy_pd_fix.kv_signal` (standard library and numpy
  only). With its CPU unit test ``tests/cache_manager/test_layer0_release.py`` this is the portable part: new files
  only, the same for every branch (``patches/0001-*.patch``).
* ``fastdeploy/cache_manager/cache_messager.py``: the branch-specific part. ``CacheMessagerV1.consume_signals`` and
  ``_add_cache_task_thread`` are located in the syntax tree and only their line ranges change: ``consume_signals``
  is replaced by the loop of :meth:`fastdeploy_pd_fix.adapters.ReleaseRuntime.consume_signals_forever` (calling
  the kv-signal op with the branch's own argument expressions) followed by three small helper methods, and one line
  is inserted right after the ``self.idx_cache_task_dict[...] = ...`` statement of ``_add_cache_task_thread``. Every
  other byte of the file stays as it is, so each branch keeps its own engine-facing calls (``get_cache_info``,
  barriers, the pre-#7724 ``finish_add_cache_task`` report and barrier).

A checkout this module does not recognise, one that already uses ``layer0_release``, and a dirty working tree are
refused with a message and exit code 1; nothing is changed then.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Dict, List, Optional, Set, Tuple

from fastdeploy_pd_fix import __version__, kv_signal, release
from fastdeploy_pd_fix.patching import (
    KV_SIGNAL_OP,
    TARGET_CLASS,
    UPSTREAMED_MODULE,
    _find_op_call,
    _is_self_expression,
)

TARGET_PATH = "fastdeploy/cache_manager/cache_messager.py"
MODULE_PATH = f"fastdeploy/cache_manager/{UPSTREAMED_MODULE}.py"
TEST_PATH = f"tests/cache_manager/test_{UPSTREAMED_MODULE}.py"
DEFAULT_BRANCH = "pd-fix/layer0-release"
DEFAULT_OUT = "pd-fix-patches"
TITLE = "[BugFix][KVCache] Rank-invariant layer-0 release in CacheMessagerV1"
PORTABLE_TITLE = "[BugFix][KVCache] Add layer0_release: rank-invariant layer-0 release core and its CPU unit tests"
#: Stands for the develop PR number in a cherry-pick title until ``--upstream-pr`` gives it.
UPSTREAM_PR_PLACEHOLDER = "TBD"
#: Identity of the commits made in a scratch repository (``--portable-only`` without ``--repo``).
SCRATCH_IDENTITY = ("fastdeploy-pd-fix", "fastdeploy-pd-fix@users.noreply.github.com")
#: Methods and attribute the patch adds to ``CacheMessagerV1``; a class that already has one is refused.
NEW_METHODS = ("_layer0_release_state", "_layer0_release_on_registration", "_layer0_release_put")
UPSTREAM_MODE_METHOD = "_layer0_release_registered"
STATE_ATTRIBUTE = "_layer0_release"
#: ``self.<name>`` attributes the rewritten methods use; the class must already use each of them.
USED_ATTRIBUTES = (
    "engine_cache_task_thread_lock",
    "engine_cache_tasks",
    "idx_cache_task_dict",
    "cache_prefilled_engine_ids_queue",
)
#: Paragraphs of release.py's docstring that talk about the plugin; the generated module has its own intro.
PLUGIN_DOC_PARAGRAPHS = 3
#: Width of the commit message's paragraphs.
MESSAGE_WIDTH = 116

LICENSE_HEADER = """\
# Copyright (c) 2026 PaddlePaddle Authors. All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""

MODULE_INTRO = """\
Rank-invariant release of layer-0 KV-cache transfer batches for ``CacheMessagerV1`` (PD disaggregation).

On the prefill side every tensor-parallel rank runs a cache messager: its ``consume_signals`` thread turns layer-0
kv signals into transfer batches while ``_add_cache_task_thread`` registers transfer tasks. Both streams are the
same on every rank; only how a rank's two threads interleave them differs. Every batch costs one
``begin_send_cache_barrier`` round and every finished request one ``finish_send_cache_barrier`` round, so all ranks
must put the same batches, in the same order, into ``cache_prefilled_engine_ids_queue``, or they wait for each
other forever. This module decides the batches from the content of the two streams alone. It has no threads,
locks, paddle or I/O: ``CacheMessagerV1`` feeds it and puts what it returns into the queue.

Generated by fastdeploy-pd-fix ``make-patch`` from its ``release.py`` and ``kv_signal.py``; change those and
regenerate rather than editing this file."""


class MakePatchError(Exception):
    """A refusal: the message says why, and nothing was changed."""


# ---------------------------------------------------------------------------------------------------------------
# The new module, generated from our own sources
# ---------------------------------------------------------------------------------------------------------------


def _lines(text: str) -> List[str]:
    """Lines with their ``\\n`` kept, split exactly where the syntax tree counts lines."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _module_parts(module) -> Tuple[str, List[ast.stmt], str]:
    """Docstring, top-level import statements and the code after them of one of our modules."""
    source = inspect.getsource(module)
    tree = ast.parse(source)
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if any(name.split(".")[0] == "fastdeploy_pd_fix" for name in names) or getattr(node, "level", 0):
            raise MakePatchError(f"{module.__name__} imports from this package; it cannot be copied upstream")
    body = list(tree.body)
    docstring = ast.get_docstring(tree, clean=True) or ""
    if docstring:
        body = body[1:]
    imports = []
    while body and isinstance(body[0], (ast.Import, ast.ImportFrom)):
        imports.append(body.pop(0))
    if not imports or any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body):
        raise MakePatchError(f"{module.__name__}: expected all imports at the top, right after the docstring")
    code = "".join(_lines(source)[imports[-1].end_lineno :]).strip("\n") + "\n"
    return docstring, imports, code


def _name_order(alias: str) -> Tuple[int, str]:
    """isort's default order of imported names: CONSTANTS, then Classes, then functions."""
    name = alias.split(" ")[0]
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name.lower()


def _merge_imports(nodes: List[ast.stmt]) -> str:
    """One isort-ordered import block (``__future__``, standard library, third party) for the given statements."""
    straight: Dict[str, Set[str]] = {"future": set(), "stdlib": set(), "third": set()}
    from_names: Dict[str, Dict[str, Set[str]]] = {"future": {}, "stdlib": {}, "third": {}}
    for node in nodes:
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        top = module.split(".")[0]
        section = "future" if top == "__future__" else "stdlib" if top in sys.stdlib_module_names else "third"
        for alias in node.names:
            text = alias.name + (f" as {alias.asname}" if alias.asname else "")
            if isinstance(node, ast.ImportFrom):
                from_names[section].setdefault(module, set()).add(text)
            else:
                straight[section].add(text)
    blocks = []
    for section in ("future", "stdlib", "third"):
        lines = [f"import {name}" for name in sorted(straight[section], key=str.lower)]
        for module in sorted(from_names[section]):
            names = ", ".join(sorted(from_names[section][module], key=_name_order))
            line = f"from {module} import {names}"
            if len(line) > 119:
                line = f"from {module} import (\n" + "".join(f"    {name},\n" for name in names.split(", ")) + ")"
            lines.append(line)
        if lines:
            blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _comment_block(text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())


def generate_module() -> str:
    """The text of ``fastdeploy/cache_manager/layer0_release.py``: our release core and kv-signal parser."""
    release_doc, release_imports, release_code = _module_parts(release)
    parser_doc, parser_imports, parser_code = _module_parts(kv_signal)
    paragraphs = release_doc.split("\n\n")[PLUGIN_DOC_PARAGRAPHS:]
    policy_doc = "\n\n".join(paragraphs)
    leaked = [word for word in ("plugin", "fastdeploy_pd_fix", "shared/docs") if word in policy_doc]
    if not paragraphs or leaked:
        raise MakePatchError(
            f"release.py's docstring changed shape (its policy part mentions {leaked or 'nothing'}); "
            "update PLUGIN_DOC_PARAGRAPHS in make_patch.py"
        )
    duplicates = _top_level_names(release_code) & _top_level_names(parser_code)
    if duplicates:
        raise MakePatchError(f"release.py and kv_signal.py both define {sorted(duplicates)}")
    docstring = f'"""{MODULE_INTRO}\n\n{policy_doc}\n"""\n'
    # isort's spacing after imports: two blank lines before a def or class, one before anything else
    after_imports = "\n\n" if re.match(r"(def|class|@)", release_code) else "\n"
    return (
        f"{LICENSE_HEADER}\n{docstring}\n{_merge_imports(release_imports + parser_imports)}{after_imports}"
        f"{release_code}\n\n# ---- kv signal buffer (from fastdeploy-pd-fix kv_signal.py) ----\n"
        f"{_comment_block(parser_doc)}\n{parser_code}"
    )


def _top_level_names(code: str) -> Set[str]:
    names = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {child.id for target in targets for child in ast.walk(target) if isinstance(child, ast.Name)}
    return names


def generate_test() -> str:
    """The text of ``tests/cache_manager/test_layer0_release.py`` (FastDeploy's pytest style, CPU and numpy only)."""
    return f"{LICENSE_HEADER}\n{UPSTREAM_TEST}"


UPSTREAM_TEST = '''\
"""Unit tests of fastdeploy.cache_manager.layer0_release on CPU (numpy only: no paddle op, no GPU, no network).

Every tensor-parallel rank of the prefill cache messager sees the same kv signals and the same registrations, each
rank in its own interleaving. The release must give every rank the same batches and drop the same tasks, whatever
the interleaving: otherwise the ranks wait on the send barriers in different orders and hang.
"""

import itertools

import numpy as np
import pytest

from fastdeploy.cache_manager import layer0_release


def kv_signal_buffer(tasks, layer=0):
    """A get_output_kv_signal buffer holding ``tasks``, each ``[engine_idx, chunk_token_offset, chunk_len]``."""
    buffer = np.full([layer0_release.KV_SIGNAL_LENGTH], -1, dtype=np.int32)
    buffer[0], buffer[1] = len(tasks), layer
    for position, task in enumerate(tasks):
        buffer[2 + 3 * position : 5 + 3 * position] = task
    return buffer


class SimulatedRank:
    """What CacheMessagerV1 does around the release: parse each signal, feed layer 0 and registrations, collect."""

    def __init__(self, mode=layer0_release.ORDERED):
        self.release = layer0_release.make_release(mode)
        self.registered = {}  # engine_idx -> need_prefill_tokens, the view of idx_cache_task_dict
        self.batches, self.drops, self.problems = [], [], []

    def on_signal(self, buffer):
        parsed = layer0_release.parse_kv_signal(buffer)
        self.problems.extend(parsed.problems)
        if parsed.signal is not None and parsed.signal.layer == 0 and parsed.signal.tasks:
            self._collect(self.release.add_signal(parsed.signal.tasks, self.registered))

    def on_registration(self, request_id, engine_idx, need_prefill_tokens):
        self.registered[engine_idx] = need_prefill_tokens
        registration = layer0_release.Registration(engine_idx, request_id, need_prefill_tokens)
        self._collect(self.release.add_registration(registration, self.registered))

    def _collect(self, released):
        self.batches.extend(released.batches)
        self.drops.extend(released.drops)


def run_rank(scenario, schedule, mode=layer0_release.ORDERED):
    """Deliver the scenario's events to one rank in ``schedule`` order: ``("sig", i)`` or ``("reg", j)``."""
    rank = SimulatedRank(mode)
    for kind, index in schedule:
        if kind == "sig":
            rank.on_signal(kv_signal_buffer(scenario["signals"][index]))
        else:
            for request in scenario["registrations"][index]:
                rank.on_registration(*request)
    return rank


def interleavings(scenario):
    """Every order of the two streams that keeps each stream in its own order."""
    signals = [("sig", index) for index in range(len(scenario["signals"]))]
    registrations = [("reg", index) for index in range(len(scenario["registrations"]))]
    total = len(signals) + len(registrations)
    for positions in itertools.combinations(range(total), len(signals)):
        signal_iter, registration_iter = iter(signals), iter(registrations)
        yield [next(signal_iter) if slot in positions else next(registration_iter) for slot in range(total)]


# signals: one list of [engine_idx, chunk_token_offset, chunk_len] per layer-0 kv signal;
# registrations: one list of (request_id, engine_idx, need_prefill_tokens) per get_cache_info read.
SCENARIOS = {
    # One signal for A and B; B registers after it on one rank only.
    "s1": {
        "signals": [[[0, 0, 4], [1, 0, 4]]],
        "registrations": [[("A", 0, 4)], [("B", 1, 4)]],
        "batches": [((0, 4), (1, 4))],
        "drops": [],
    },
    # Chunked prefill: A needs 8 tokens in two chunks, both chunk signals may beat A's registration.
    "s2": {
        "signals": [[[0, 0, 4]], [[0, 4, 4]]],
        "registrations": [[("A", 0, 8)]],
        "batches": [((0, 4),), ((0, 8),)],
        "drops": [],
    },
    # Order across requests: A (two chunks) and B (one) in one signal, B registers first.
    "s3": {
        "signals": [[[0, 0, 4], [1, 0, 4]], [[0, 4, 4]]],
        "registrations": [[("B", 1, 4)], [("A", 0, 8)]],
        "batches": [((0, 4), (1, 4)), ((0, 8),)],
        "drops": [],
    },
    # A duplicated chunk of A and a task of B beyond its need_prefill_tokens are dropped, on every rank alike.
    "drops": {
        "signals": [[[0, 0, 4]], [[0, 0, 4]], [[0, 4, 4], [1, 0, 6]]],
        "registrations": [[("A", 0, 8), ("B", 1, 4)]],
        "batches": [((0, 4),), ((0, 8),)],
        "drops": [(0, 4), (1, 6)],
    },
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_two_ranks_release_the_same_batches_in_every_interleaving(name):
    scenario = SCENARIOS[name]
    orders = list(interleavings(scenario))
    ranks = [run_rank(scenario, order) for order in orders]
    for order, rank in zip(orders, ranks):
        assert rank.batches == scenario["batches"], order
        assert [(drop.slot, drop.prefilled_token_num) for drop in rank.drops] == scenario["drops"], order
        assert rank.drops == ranks[0].drops, order  # the same reasons too
        assert rank.problems == []


def test_nothing_is_released_before_registration():
    scenario = SCENARIOS["s3"]
    rank = run_rank(scenario, [("sig", 0), ("sig", 1), ("reg", 0)])
    assert rank.batches == []  # A's chunk heads the signal log and A is not registered yet
    rank = run_rank(scenario, [("sig", 0), ("sig", 1), ("reg", 0), ("reg", 1)])
    assert rank.batches == scenario["batches"]


def test_malformed_signals_are_reported_alike_and_do_not_disturb_the_release():
    malformed = [
        np.array([600, 0] + [0] * (layer0_release.KV_SIGNAL_LENGTH - 2), dtype=np.int32),  # count out of range
        kv_signal_buffer([[0, 0, 4]], layer=-1),  # negative layer
        kv_signal_buffer([[-1, 0, 4], [600, 0, 4], [0, 0, 0]]),  # bad slots, zero length: every task dropped
        np.zeros([1], dtype=np.int32),  # truncated buffer
    ]
    ranks = []
    for malformed_first in (True, False):
        rank = SimulatedRank()
        if not malformed_first:
            rank.on_registration("A", 0, 4)
        for buffer in malformed:
            rank.on_signal(buffer)
        rank.on_signal(kv_signal_buffer([[0, 0, 4], [-5, 0, 4]]))  # one valid task, one malformed
        if malformed_first:
            rank.on_registration("A", 0, 4)
        ranks.append(rank)
    assert ranks[0].batches == ranks[1].batches == [((0, 4),)]
    assert ranks[0].problems == ranks[1].problems
    assert len(ranks[0].problems) == 7


def test_parse_kv_signal_reads_progress_and_no_signal():
    parsed = layer0_release.parse_kv_signal(kv_signal_buffer([[3, 128, 64], [7, 0, 16]], layer=2))
    assert parsed.problems == []
    assert parsed.signal == layer0_release.KvSignal(2, ((3, 192), (7, 16)))
    empty = layer0_release.parse_kv_signal(np.full([layer0_release.KV_SIGNAL_LENGTH], -1, dtype=np.int32))
    assert empty.signal is None and empty.problems == []


def test_upstream_mode_keeps_the_8034_behaviour_that_diverges_on_chunked_prefill():
    scenario = SCENARIOS["s2"]
    rank0 = run_rank(scenario, [("reg", 0), ("sig", 0), ("sig", 1)], mode=layer0_release.UPSTREAM)
    rank1 = run_rank(scenario, [("sig", 0), ("sig", 1), ("reg", 0)], mode=layer0_release.UPSTREAM)
    assert rank0.batches == [((0, 4),), ((0, 8),)]
    assert rank1.batches == [((0, 8),)]  # one batch instead of two: the ranks' barrier rounds differ


def test_invalid_registration_and_mode_are_rejected():
    with pytest.raises(ValueError):
        layer0_release.Registration(0, "A", 0)
    with pytest.raises(ValueError):
        layer0_release.make_release("unknown")
'''


# ---------------------------------------------------------------------------------------------------------------
# The branch-specific part: CacheMessagerV1's two methods, rewritten by line range
# ---------------------------------------------------------------------------------------------------------------

CONSUME_SIGNALS = Template(
    '''\
def consume_signals(self):
    """Read kv signals, record each task's progress, and hand layer-0 tasks to the rank-invariant release.

    Every TP rank sees the same kv signals and registrations, each rank in its own interleaving. The release
    (fastdeploy/cache_manager/layer0_release.py) makes the batches put into cache_prefilled_engine_ids_queue a
    function of those two streams alone, so that every rank waits on the send barriers in the same order.
    """
${imports}    from fastdeploy.cache_manager import layer0_release

    paddle.device.set_device("cpu")
    kv_signal_data = paddle.full([layer0_release.KV_SIGNAL_LENGTH], -1, dtype="int32")
    while True:
        try:
            ${op_call}
            parsed = layer0_release.parse_kv_signal(kv_signal_data.numpy(), num_slots=len(self.engine_cache_tasks))
            for problem in parsed.problems:
                logger.warning(f"consume_signals: malformed kv signal: {problem}")
            signal = parsed.signal
            if signal is None:
                if not parsed.problems:
                    time.sleep(0.001)  # no signal yet (non-blocking read): do not spin
                continue
            with self.engine_cache_task_thread_lock:
                for engine_idx, prefilled_token_num in signal.tasks:
                    self.engine_cache_tasks[engine_idx]["prefilled_layer_idx"] = signal.layer
                    self.engine_cache_tasks[engine_idx]["prefilled_token_num"] = prefilled_token_num
            if signal.layer == 0 and signal.tasks:
                release, release_lock = self._layer0_release_state()
                with release_lock:
                    released = release.add_signal(signal.tasks${registered})
                    self._layer0_release_put(released, "kv signal")
        except Exception as e:
            logger.exception(f"consume_signals: {e!r}; continuing")
            time.sleep(0.01)

def _layer0_release_state(self):
    """The layer-0 release policy and its lock, created on first use by whichever prefill thread comes first."""
${state_imports}    from fastdeploy.cache_manager import layer0_release

    state = (layer0_release.make_release("${mode}"), threading.Lock())
    # dict.setdefault is atomic: both threads get the same policy and lock, a racing thread's pair is dropped.
    return self.__dict__.setdefault("${state_attribute}", state)

def _layer0_release_on_registration(self, engine_idx):
    """Feed the task just stored in idx_cache_task_dict[engine_idx] to the release and put what became ready."""
    from fastdeploy.cache_manager import layer0_release

    try:
        task = self.idx_cache_task_dict[engine_idx]
        registration = layer0_release.Registration(
            int(engine_idx), str(task["request_id"]), int(task["need_prefill_tokens"])
        )
        release, release_lock = self._layer0_release_state()
        with release_lock:
            released = release.add_registration(registration${registered})
            self._layer0_release_put(released, "registration")
    except Exception as e:
        logger.exception(f"layer0 release: registration of engine_idx={engine_idx} not handled: {e!r}")

def _layer0_release_put(self, released, source):
    """Put the released batches into cache_prefilled_engine_ids_queue, in order, and log dropped tasks."""
    for reason in released.ignored:
        logger.warning(f"layer0 release: {reason}")
    for drop in released.drops:
        logger.warning(
            f"layer0 release: dropped task engine_idx={drop.slot} prefilled_token_num={drop.prefilled_token_num} "
            f"from {source}: {drop.reason}"
        )
    for batch in released.batches:
        self.cache_prefilled_engine_ids_queue.put(list(batch))
        logger.info(f"layer0 release: batch {list(batch)} from {source}")
'''
)

#: Only with ``--mode upstream``: #8034's policy decides by what idx_cache_task_dict holds at the moment.
REGISTERED_VIEW = '''
def _layer0_release_registered(self):
    """engine_idx -> need_prefill_tokens of the registered tasks (the upstream policy decides by it)."""
    return {slot: int(task["need_prefill_tokens"]) for slot, task in dict(self.idx_cache_task_dict).items()}
'''


@dataclass
class TargetPlan:
    """What the syntax tree of one branch's ``cache_messager.py`` gave, and the two edits to make."""

    consume: ast.FunctionDef
    register: ast.FunctionDef
    store: ast.Assign
    slot_expression: str
    op_call: str
    local_imports: List[str]
    module_names: Set[str]
    has_pending_buffer: bool
    reports_finished_add: bool
    notes: List[str] = field(default_factory=list)

    def registration_calls(self) -> str:
        if self.reports_finished_add:
            return "put_finished_add_cache_task_req and finish_add_cache_task_barrier (pre-#7724)"
        return "no finish_add_cache_task report or barrier (#7724)"

    def features(self) -> str:
        buffer = "pending_layer0_signals (#7872+)" if self.has_pending_buffer else "no pending buffer (pre-#7872)"
        return f"{self.op_call}; {self.registration_calls()}; {buffer}"


def _imports_layer0_release(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or ""] + [alias.name for alias in node.names]
            if any(UPSTREAMED_MODULE in name for name in names):
                return True
    return False


def _module_names(statements: List[ast.stmt]) -> Set[str]:
    """Names bound at module level (imports, assignments, definitions), also inside if/try blocks."""
    names: Set[str] = set()
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {child.id for target in targets for child in ast.walk(target) if isinstance(child, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            nested = node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            nested += [statement for handler in getattr(node, "handlers", []) for statement in handler.body]
            names |= _module_names(nested)
    return names


def _class_functions(cls: ast.ClassDef, name: str) -> List[ast.FunctionDef]:
    """Every definition of method ``name`` in the class body, also inside if/try blocks of the body."""
    found, pending = [], list(cls.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            pending += [statement for handler in getattr(node, "handlers", []) for statement in handler.body]
    return found


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    found = _class_functions(cls, name)
    if len(found) != 1 or found[0] not in cls.body:
        where = "defined conditionally or more than once" if found else "missing"
        raise MakePatchError(f"{TARGET_CLASS}.{name} is {where} in {TARGET_PATH}; this checkout is not recognised")
    if isinstance(found[0], ast.AsyncFunctionDef):
        raise MakePatchError(f"{TARGET_CLASS}.{name} is async; this checkout is not recognised")
    return found[0]


def _is_simple_expression(node: ast.AST) -> bool:
    """Names, attributes, constants and constant subscripts: safe to evaluate a second time."""
    allowed = (ast.Name, ast.Attribute, ast.Subscript, ast.Constant, ast.Load)
    return all(isinstance(child, allowed) for child in ast.walk(node))


def _alone_on_its_lines(lines: List[str], node: ast.stmt) -> bool:
    before = lines[node.lineno - 1][: node.col_offset]
    after = lines[node.end_lineno - 1][node.end_col_offset :].strip()
    return not before.strip() and (not after or after.startswith("#"))


def _task_store(register: ast.FunctionDef, lines: List[str]) -> ast.Assign:
    stores = [
        node
        for node in ast.walk(register)
        if isinstance(node, ast.Assign)
        and any(
            isinstance(target, ast.Subscript) and ast.unparse(target.value) == "self.idx_cache_task_dict"
            for target in node.targets
        )
    ]
    if len(stores) != 1:
        raise MakePatchError(
            f"expected one `self.idx_cache_task_dict[...] = ...` statement in _add_cache_task_thread, "
            f"found {len(stores)}; this checkout is not recognised"
        )
    store = stores[0]
    if len(store.targets) != 1 or not _is_simple_expression(store.targets[0].slice):
        raise MakePatchError(f"unexpected task store `{ast.unparse(store)}`; this checkout is not recognised")
    if not _alone_on_its_lines(lines, store):
        raise MakePatchError(f"the task store `{ast.unparse(store)}` shares its line with other code")
    return store


def analyse_source(source: str) -> TargetPlan:
    """Check one branch's ``cache_messager.py`` and find what to edit; raise :class:`MakePatchError` if refused."""
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise MakePatchError(f"{TARGET_PATH} does not parse: {error}") from error
    if _imports_layer0_release(tree):
        raise MakePatchError(f"{TARGET_PATH} already imports {UPSTREAMED_MODULE}: this branch is already fixed")
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == TARGET_CLASS]
    if len(classes) != 1:
        raise MakePatchError(f"expected one class {TARGET_CLASS} in {TARGET_PATH}, found {len(classes)}")
    cls = classes[0]
    consume, register = _method(cls, "consume_signals"), _method(cls, "_add_cache_task_thread")
    _method(cls, "__init__")

    call, _, problem = _find_op_call(consume)
    if call is None:
        raise MakePatchError(f"{problem}; this checkout is not recognised")
    if len(call.args) < 3 or call.keywords or not all(_is_self_expression(arg) for arg in call.args[1:]):
        raise MakePatchError(f"unexpected {KV_SIGNAL_OP} call `{ast.unparse(call)}`; this checkout is not recognised")
    op_call = ast.unparse(ast.Call(call.func, [ast.Name("kv_signal_data")] + call.args[1:], []))

    lines = _lines(source)
    store = _task_store(register, lines)
    attributes = {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute)}
    missing = [name for name in USED_ATTRIBUTES if name not in attributes]
    if missing:
        raise MakePatchError(f"{TARGET_CLASS} does not use {', '.join(missing)}; this checkout is not recognised")
    taken = [name for name in NEW_METHODS + (UPSTREAM_MODE_METHOD, STATE_ATTRIBUTE) if name in attributes]
    taken += [name for name in NEW_METHODS + (UPSTREAM_MODE_METHOD,) if _class_functions(cls, name)]
    if taken:
        raise MakePatchError(f"{TARGET_CLASS} already has {', '.join(sorted(set(taken)))}; refusing to overwrite")

    local_imports = [node for node in ast.walk(consume) if isinstance(node, (ast.Import, ast.ImportFrom))]
    module_names = _module_names(tree.body)
    op_root = ast.unparse(call.func).split(".")[0]
    local_names = _module_names(local_imports)
    if op_root not in module_names | local_names:
        raise MakePatchError(f"cannot tell where {op_root} comes from in {TARGET_PATH}")
    if "logger" not in module_names:
        raise MakePatchError(f"{TARGET_PATH} has no module-level `logger`")
    register_attributes = {node.attr for node in ast.walk(register) if isinstance(node, ast.Attribute)}
    return TargetPlan(
        consume=consume,
        register=register,
        store=store,
        slot_expression=ast.unparse(store.targets[0].slice),
        op_call=op_call,
        local_imports=[ast.unparse(node) for node in local_imports],
        module_names=module_names | local_names,
        has_pending_buffer="pending_layer0_signals" in attributes,
        reports_finished_add="finish_add_cache_task_barrier" in register_attributes,
    )


def _indent(text: str, prefix: str, newline: str) -> List[str]:
    return [(prefix + line if line.strip() else "") + newline for line in text.split("\n")]


def patch_source(source: str, mode: str = release.ORDERED) -> Tuple[str, TargetPlan]:
    """``cache_messager.py`` with the two edits, and the plan they came from. Other lines are left byte-identical."""
    if mode not in release.MODES:
        raise MakePatchError(f"unknown mode {mode!r}; expected one of {', '.join(release.MODES)}")
    plan = analyse_source(source)
    lines = _lines(source)
    def_line = lines[plan.consume.lineno - 1]
    newline = "\r\n" if def_line.endswith("\r\n") else "\n"
    method_prefix = def_line[: plan.consume.col_offset]
    consume_needs = [name for name in ("paddle", "time") if name not in plan.module_names]
    imports = plan.local_imports + [f"import {name}" for name in consume_needs]
    state_imports = [] if "threading" in plan.module_names else ["import threading"]
    upstream = mode == release.UPSTREAM
    methods = CONSUME_SIGNALS.substitute(
        imports="".join(f"    {statement}\n" for statement in imports),
        state_imports="".join(f"    {statement}\n" for statement in state_imports),
        op_call=plan.op_call,
        mode=mode,
        registered=f", self.{UPSTREAM_MODE_METHOD}()" if upstream else "",
        state_attribute=STATE_ATTRIBUTE,
    )
    methods += REGISTERED_VIEW if upstream else ""
    replacement = _indent(methods.rstrip("\n"), method_prefix, newline)

    store_line = lines[plan.store.lineno - 1]
    hook = (
        f"{store_line[: plan.store.col_offset]}self._layer0_release_on_registration({plan.slot_expression}){newline}"
    )
    edits = [  # (first line, last line, new lines), applied bottom-up so that line numbers stay valid
        (plan.consume.lineno, plan.consume.end_lineno, replacement),
        (plan.store.end_lineno + 1, plan.store.end_lineno, [hook]),
    ]
    for first, last, new_lines in sorted(edits, key=lambda edit: edit[0], reverse=True):
        lines[first - 1 : last] = new_lines
    patched = "".join(lines)
    ast.parse(patched)  # never write a file that does not parse
    return patched, plan


# ---------------------------------------------------------------------------------------------------------------
# Commit messages (FastDeploy's PR template)
# ---------------------------------------------------------------------------------------------------------------

RELATED = """\
Related upstream PRs: #7872 (buffer early layer-0 signals; release/2.6 cherry-pick #7896), #8034 (every layer-0
signal through the pending buffer, one batch per request; release/2.6 cherry-pick #8035), #7724 (removed the
finish_add_cache_task report and barrier, send loop waits for registration)."""

CHECKLIST = """\
## Checklist

- [x] Add at least a tag in the PR title: {tags}
- [ ] Format your code, run `pre-commit` before commit.
- [x] Add unit tests: tests/cache_manager/test_layer0_release.py (CPU, numpy only). Multi-rank runs of the patched
  CacheMessagerV1 are in fastdeploy-pd-fix (`fastdeploy-pd-fix demo`, its tests/test_make_patch.py).
- [ ] Provide accuracy results: not applicable (no numerical change, see Accuracy Tests).
- [{cherry_pick}] If the current PR is submitting to the `release` branch, make sure the PR has been submitted to the
  `develop` branch, then cherry-pick it to the `release` branch with the `[Cherry-Pick]` PR tag."""


def is_release_branch(base: str) -> bool:
    return re.search(r"(^|/)release/", base) is not None


def commit_title(base: str, upstream_pr: Optional[str], portable: bool = False) -> str:
    """The PR title; ``[Cherry-Pick]...(#N)`` on a ``release/*`` base (N from ``--upstream-pr``, else TBD)."""
    title = PORTABLE_TITLE if portable else TITLE
    if portable or not is_release_branch(base):
        return title
    number = str(upstream_pr or UPSTREAM_PR_PLACEHOLDER).lstrip("#")
    return f"[Cherry-Pick]{title} (#{number})"


def portable_message() -> str:
    return f"""{PORTABLE_TITLE}

## Motivation

On the prefill side of PD disaggregation every TP rank's cache messager must put the same sequence of KV-cache
transfer batches into cache_prefilled_engine_ids_queue, or the ranks block each other forever at
begin_send_cache_barrier / finish_send_cache_barrier. Which batches upstream puts depends on whether a layer-0 kv
signal or its task's registration reaches a rank first, and that differs between ranks: #8034 fixed the
single-chunk case, chunked prefill with early signals and the order across requests still hang. This commit adds
the release logic that makes the batch sequence a function of the two streams alone, on its own.

## Modifications

- New fastdeploy/cache_manager/layer0_release.py (standard library and numpy only): parse_kv_signal validates a
  get_output_kv_signal buffer once through numpy (malformed counts, layers and tasks are reported and dropped);
  OrderedRelease releases layer-0 signals strictly in arrival order, one batch per signal, each once all its tasks
  are bound to their registrations, and drops a task that cannot belong to its registration by a content-only rule
  (the same decision on every rank); UpstreamRelease keeps #8034's behaviour for comparison.
- New tests/cache_manager/test_layer0_release.py.
- No existing file changes: CacheMessagerV1 is switched over by a separate, branch-specific commit (see Usage).

## Usage or Command

python -m pytest tests/cache_manager/test_layer0_release.py

The branch-specific commit that makes CacheMessagerV1 use this module comes from
`fastdeploy-pd-fix make-patch --repo <FastDeploy checkout> --base <branch>`.

## Accuracy Tests

Not applicable: new module and tests only, nothing calls it yet.

{CHECKLIST.format(tags="[BugFix][KVCache]", cherry_pick=" ")}

{RELATED}
"""


def full_message(title: str, base: str, mode: str, plan: TargetPlan, upstream_pr: Optional[str], adds_module: bool):
    cherry_pick = is_release_branch(base)
    if cherry_pick and not upstream_pr:
        origin = (
            f"Cherry-pick of the develop PR (#{UPSTREAM_PR_PLACEHOLDER}: its number was not known when this commit "
            "was generated; amend the title, or regenerate with `make-patch --upstream-pr N`)."
        )
    elif cherry_pick:
        origin = f"Cherry-pick of #{str(upstream_pr).lstrip('#')} to {base}."
    else:
        origin = ""
    origin = textwrap.fill(origin, MESSAGE_WIDTH, break_on_hyphens=False) + "\n\n" if origin else ""
    tags = "[Cherry-Pick][BugFix][KVCache]" if cherry_pick else "[BugFix][KVCache]"
    generated = textwrap.fill(
        f"Generated by fastdeploy-pd-fix {__version__} `make-patch --mode {mode}` from `{base}`, where it found: "
        f"{plan.features()}.",
        MESSAGE_WIDTH,
        break_on_hyphens=False,
        break_long_words=False,
    )
    checklist = CHECKLIST.format(tags=tags, cherry_pick="x" if cherry_pick else " ")
    module_line = (
        "- New fastdeploy/cache_manager/layer0_release.py (standard library and numpy only): the kv-signal parser and "
        "the release policy, with CPU unit tests in tests/cache_manager/test_layer0_release.py."
        if adds_module
        else "- fastdeploy/cache_manager/layer0_release.py and its tests are already on this branch (portable commit)."
    )
    mode_line = (
        "- Mode `upstream`: the policy keeps #8034's behaviour (for A/B comparison only; it is not rank-invariant)."
        if mode == release.UPSTREAM
        else ""
    )
    modifications = "\n".join(
        textwrap.fill(line, MESSAGE_WIDTH, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
        for line in (
            module_line,
            f"- CacheMessagerV1.consume_signals reads with the same call as before on this branch "
            f"(`{plan.op_call}`), parses the buffer once through numpy, records prefilled_layer_idx and "
            "prefilled_token_num under engine_cache_task_thread_lock as before, and hands layer-0 tasks to the "
            "release; malformed signals and dropped tasks are logged, and no exception ends the thread.",
            f"- CacheMessagerV1._add_cache_task_thread: one line added right after "
            f"`{ast.unparse(plan.store)}`, which hands the stored task to the release. Its engine-facing calls stay "
            f"as they are on this branch: get_cache_info, cache_info_barrier, {plan.registration_calls()}.",
            "- Three small new methods: _layer0_release_state, _layer0_release_on_registration, _layer0_release_put."
            " The policy and its lock are created lazily, on first use by either prefill thread (dict.setdefault, "
            "so both threads get the same pair): this leaves __init__ untouched and keeps the diff to the two methods"
            " the fix is about.",
            (
                "- pending_layer0_signals and its recovery/cleanup code stay as they are: the new consume_signals "
                "never fills the buffer, so they find nothing. Removing them can be a follow-up; it is left out to "
                "keep this change small and easy to cherry-pick."
                if plan.has_pending_buffer
                else ""
            ),
            mode_line,
        )
        if line
    )
    return f"""{title}

## Motivation

{origin}In PD disaggregation the prefill cache messager of every TP rank turns layer-0 kv signals into transfer
batches (consume_signals) while another thread registers transfer tasks (_add_cache_task_thread). Both streams are
the same on every rank; which one a rank sees first is not. The batches put into cache_prefilled_engine_ids_queue
depended on that timing, so ranks could wait on begin_send_cache_barrier / finish_send_cache_barrier in different
orders and block each other forever. #8034 fixed single-chunk requests; chunked prefill with early signals and the
order across requests still hang. With this change the batch sequence is a function of the two streams alone: the
same on every rank, whatever the thread timing.

## Modifications

{modifications}

{generated}

## Usage or Command

No new option: PD disaggregation with ENABLE_V1_KVCACHE_SCHEDULER=1, prefill role, TP >= 2, as before.

python -m pytest tests/cache_manager/test_layer0_release.py

## Accuracy Tests

No numerical change: the same KV cache blocks are sent; only the grouping and order of transfer batches is made
the same on every rank. Multi-process runs of the race scenarios (two ranks, forced interleavings) finish on the
patched messager where the unpatched one hangs.

{checklist}

{RELATED}
"""


# ---------------------------------------------------------------------------------------------------------------
# git
# ---------------------------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str, input_text: Optional[str] = None, env: Optional[dict] = None) -> str:
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


def _git_ok(repo: Path, *args: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True).returncode == 0


def _show(repo: Path, base: str, path: str) -> Optional[bytes]:
    result = subprocess.run(["git", "-C", str(repo), "show", f"{base}:{path}"], capture_output=True)
    return result.stdout if result.returncode == 0 else None


@dataclass
class PatchResult:
    branch: str
    base: str
    title: str
    patches: List[Path]
    notes: List[str]


def _commit_on_new_branch(repo, branch, base_commit, files, message, identity, no_verify, commit_env) -> None:
    """Create ``branch`` at ``base_commit``, write and commit ``files``; on failure go back to where we were."""
    original = _git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    if original == "HEAD":
        original = _git(repo, "rev-parse", "HEAD").strip()
    _git(repo, "checkout", "--quiet", "-b", branch, base_commit)
    try:
        for path, text in files.items():
            target_file = repo / path
            target_file.parent.mkdir(parents=True, exist_ok=True)
            target_file.write_bytes(text.encode("utf-8"))
        _git(repo, "add", "--", *files)
        commit_args = ["commit", "--quiet", "--cleanup=whitespace", "-F", "-"] + (["--no-verify"] * no_verify)
        _git(repo, *identity, *commit_args, input_text=message, env=commit_env)
    except MakePatchError as error:
        _git(repo, "reset", "--quiet", "--hard")  # the tree was clean: this drops only what was written above
        for path in files:
            if (repo / path).exists() and not _git_ok(repo, "ls-files", "--error-unmatch", path):
                (repo / path).unlink()
        _git(repo, "checkout", "--quiet", original)
        _git(repo, "branch", "--quiet", "-D", branch)
        raise MakePatchError(f"{error} (nothing committed; commit hooks can be skipped with --no-verify)") from error


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
    if not _git_ok(Path(repo), "rev-parse", "--git-dir"):
        raise MakePatchError(f"{repo} is not a git checkout")
    repo = Path(_git(Path(repo), "rev-parse", "--show-toplevel").strip())
    if _git(repo, "status", "--porcelain", "--untracked-files=no").strip():
        raise MakePatchError(f"the working tree of {repo} has uncommitted changes; commit or stash them first")
    if base is None:
        current = subprocess.run(
            ["git", "-C", str(repo), "symbolic-ref", "-q", "--short", "HEAD"], capture_output=True
        )
        base = current.stdout.decode().strip() or "HEAD"
    if not _git_ok(repo, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"):
        raise MakePatchError(f"base {base!r} is not a branch or commit of {repo}")
    base_commit = _git(repo, "rev-parse", "--verify", f"{base}^{{commit}}").strip()

    files: Dict[str, str] = {}
    notes: List[str] = []
    for path, text in ((MODULE_PATH, generate_module()), (TEST_PATH, generate_test())):
        existing = _show(repo, base_commit, path)
        if existing is None:
            files[path] = text
        elif existing.decode("utf-8", errors="replace") != text:
            raise MakePatchError(f"{path} exists on {base} and differs from what this version generates")
    adds_module = MODULE_PATH in files
    plan = None
    if portable_only:
        if not files:
            raise MakePatchError(f"{MODULE_PATH} and {TEST_PATH} are already on {base}: nothing to do")
        title, message = PORTABLE_TITLE, portable_message()
    else:
        target = _show(repo, base_commit, TARGET_PATH)
        if target is None:
            raise MakePatchError(f"{base} has no {TARGET_PATH}; this checkout is not recognised")
        try:
            source = target.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MakePatchError(f"{TARGET_PATH} is not UTF-8: {error}") from error
        files[TARGET_PATH], plan = patch_source(source, mode)
        title = commit_title(base, upstream_pr)
        message = full_message(title, base, mode, plan, upstream_pr, adds_module)
        if is_release_branch(base) and not upstream_pr:
            notes.append(
                f"title uses the placeholder #{UPSTREAM_PR_PLACEHOLDER}: amend it, or rerun with --upstream-pr N"
            )
    if _git_ok(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"):
        raise MakePatchError(f"branch {branch} already exists in {repo}; delete it or pass --branch")
    for path in files:
        if (repo / path).exists() and not _git_ok(repo, "ls-files", "--error-unmatch", path):
            raise MakePatchError(f"untracked {path} in {repo} would be overwritten; move it away first")

    identity = []
    if not _git_ok(repo, "config", "user.email"):
        identity = ["-c", f"user.name={SCRATCH_IDENTITY[0]}", "-c", f"user.email={SCRATCH_IDENTITY[1]}"]
        notes.append(f"git user.email is not set: committed as {SCRATCH_IDENTITY[0]} <{SCRATCH_IDENTITY[1]}>")
    _commit_on_new_branch(repo, branch, base_commit, files, message, identity, no_verify, commit_env)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    format_args = ["format-patch", "--no-signature", "-o", str(out)]  # a signature line ends in a space
    format_args += ["--zero-commit"] if zero_commit else []
    written = _git(repo, *format_args, f"{base_commit}..{branch}").splitlines()
    if plan is not None:
        notes.append(f"target: {plan.features()}")
    return PatchResult(branch, base, title, [Path(path) for path in written], notes)


def portable_patch(out) -> List[Path]:
    """Write the portable patch (new module and its test) into ``out``, made in a scratch repository.

    The scratch repository holds just ``fastdeploy/cache_manager/__init__.py``; the patch only adds files, so it
    applies with ``git am`` to any FastDeploy branch. Commit dates come from ``SOURCE_DATE_EPOCH`` when set.
    """
    stamp = os.environ.get("SOURCE_DATE_EPOCH", str(int(time.time())))
    dates = {"GIT_AUTHOR_DATE": f"@{stamp} +0000", "GIT_COMMITTER_DATE": f"@{stamp} +0000"}
    with tempfile.TemporaryDirectory(prefix="pd-fix-portable-") as scratch:
        repo = Path(scratch)
        _git(repo, "init", "--quiet", "--initial-branch=develop")
        _git(repo, "config", "user.name", SCRATCH_IDENTITY[0])
        _git(repo, "config", "user.email", SCRATCH_IDENTITY[1])
        _git(repo, "config", "core.hooksPath", os.devnull)
        (repo / "fastdeploy" / "cache_manager").mkdir(parents=True)
        (repo / "fastdeploy" / "cache_manager" / "__init__.py").write_text("", encoding="utf-8")
        _git(repo, "add", ".")
        _git(repo, "commit", "--quiet", "-m", "scratch FastDeploy layout", env=dates)
        result = make_patch(repo, portable_only=True, out=out, zero_commit=True, commit_env=dates)
    return result.patches


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastdeploy-pd-fix make-patch",
        description="Commit the rank-invariant layer-0 release into a FastDeploy git checkout and write it as "
        "git format-patch files (apply them with `git am --keep-non-patch`, which keeps the [BugFix][KVCache] tags).",
    )
    parser.add_argument("--repo", help="FastDeploy git checkout (optional with --portable-only: a scratch repo)")
    parser.add_argument("--base", help="branch or commit to start from (default: the current branch)")
    parser.add_argument("--mode", choices=release.MODES, default=release.ORDERED, help="release policy to wire in")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for the patch files (default: ./{DEFAULT_OUT})")
    parser.add_argument(
        "--branch", default=DEFAULT_BRANCH, help=f"new branch to commit on (default: {DEFAULT_BRANCH})"
    )
    parser.add_argument(
        "--upstream-pr",
        help="number of the develop PR, for the [Cherry-Pick] title on release/* bases "
        f"(default: the placeholder #{UPSTREAM_PR_PLACEHOLDER})",
    )
    parser.add_argument(
        "--portable-only", action="store_true", help="only the new module and its test (no cache_messager.py change)"
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
