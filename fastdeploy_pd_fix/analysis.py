"""The one source-based analyser of FastDeploy's ``CacheMessagerV1``: what the plugin and ``make-patch`` rely on.

Both read the syntax tree of ``cache_messager.py``: :func:`analyse_class` the source of a live class's module (the
plugin, before it patches; the running methods found there by :mod:`fastdeploy_pd_fix.live_source`),
:func:`analyse_source` the text of a file (``make-patch``, on a branch's checkout). The same rules decide in both
cases (see :func:`_analyse_methods`):

* ``consume_signals`` makes exactly one ``get_output_kv_signal`` call, with the buffer first and then only arguments
  we can evaluate with the instance alone (constants and ``self.a.b`` chains, see :class:`OpArgument`);
* ``_add_cache_task_thread`` stores tasks by ``self.idx_cache_task_dict[...] = ...``;
* a release that already uses ``layer0_release`` (the fix, upstreamed) is left alone.

The release features reported besides come from calls, not from definitions: a method's presence is not its use.
A call counts where it runs in every deployment: in the method itself or in a ``self.<method>(...)`` it calls, but
not under an ``if`` on the storage transfer switch (:data:`STORAGE_SWITCH`), which some releases guard
``_maybe_wait_for_cache_task`` with (see :func:`_calls_from`).

What a live class needs besides (its methods are the ones the interpreter runs) and what a file needs besides (one
unconditional definition of each method, the attributes the rewritten methods use) is checked where it applies.
Nothing here imports FastDeploy or runs its code (but :meth:`TargetAnalysis.kv_signal_op`, which the running messager
calls at activation), and no function raises: a surprise is an unrecognised target.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from fastdeploy_pd_fix.live_source import SourceMismatch, live_function, running_definition
from fastdeploy_pd_fix.target import (
    FINISH_ADD_BARRIER,
    KV_SIGNAL_OP,
    PATCHED_METHODS,
    PENDING_BUFFER,
    TARGET_CLASS,
    UPSTREAMED_PACKAGE,
    USED_ATTRIBUTES,
)

#: The methods whose source is analysed: the two patched ones and ``__init__`` (the pending buffer).
ANALYSED_METHODS = PATCHED_METHODS + ("__init__",)
#: The store the registration hook follows, as written in ``_add_cache_task_thread``.
TASK_DICT = "self.idx_cache_task_dict"
ALREADY_FIXED = f"FastDeploy already carries the rank-invariant release (it uses {UPSTREAMED_PACKAGE})"
#: Why a recognised messager that reports every registration is left alone (see :attr:`TargetAnalysis.cannot_race`).
CANNOT_RACE = (
    "this release cannot race: its messagers report every registration (finish_add_cache_task_barrier, before "
    "#7724) and its engine computes a request only after every rank's report, so no layer-0 signal beats its "
    "registration; nothing to fix"
)
#: The send loop, and the registration wait #7724 made it call (some releases: only on the storage transfer path).
SEND_LOOP = "prefill_layerwise_send_cache_thread"
REGISTRATION_WAIT = "_maybe_wait_for_cache_task"
#: The switch of the storage transfer path (``envs.FD_PD_TRANSFER_VIA_STORAGE``), matched case-insensitively in
#: the test of an ``if``: code only under it does not run in an RDMA/IPC deployment.
STORAGE_SWITCH = "via_storage"


@dataclass(frozen=True)
class OpArgument:
    """One argument of the kv-signal op call after the buffer, as written: ``"self.rank_id"``, ``"0"``, ``"-1"``."""

    source: str

    @staticmethod
    def evaluable(node: ast.AST) -> bool:
        """True for what :meth:`evaluate` can compute: constants, ``-x``, ``self`` and ``self.a.b`` chains."""
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return OpArgument.evaluable(node.operand)
        if isinstance(node, ast.Attribute):
            return OpArgument.evaluable(node.value) and not isinstance(node.value, ast.Constant)
        return isinstance(node, ast.Name) and node.id == "self"

    def evaluate(self, instance):
        """The argument's value for ``instance`` (the messager); ValueError for anything but the forms above."""
        try:
            node = ast.parse(self.source, mode="eval").body
        except SyntaxError as error:
            raise ValueError(f"op argument {self.source!r} does not parse: {error}") from None
        if not self.evaluable(node):
            raise ValueError(f"op argument {self.source!r} is not a constant or a self.<attribute> chain")
        return _evaluate(node, instance)


def _evaluate(node: ast.AST, instance):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand, instance)
    if isinstance(node, ast.Attribute):
        return getattr(_evaluate(node.value, instance), node.attr)
    return instance


@dataclass(frozen=True)
class TargetAnalysis:
    """What the checks found in one ``CacheMessagerV1``, and whether it can be patched.

    The syntax-tree nodes (``consume``, ``register``, ``task_stores``, ``local_imports``) are those of the analysed
    source, with its line numbers: ``make-patch`` rewrites their line ranges.
    """

    recognised: bool
    reason: str
    op_arguments: Tuple[OpArgument, ...] = ()
    #: ``X`` of a ``from X import get_output_kv_signal`` inside ``consume_signals``; None: the op is a module global.
    op_import_module: Optional[str] = None
    has_pending_buffer: bool = False
    #: ``_add_cache_task_thread`` calls ``finish_add_cache_task_barrier`` (``.wait()``, before #7724 removed it).
    reports_finished_add: bool = False
    #: The send loop calls ``_maybe_wait_for_cache_task`` (#7724), outside the storage transfer branch.
    waits_for_registration: bool = False
    #: The send loop calls ``_maybe_wait_for_cache_task`` only in the storage transfer branch.
    waits_for_registration_via_storage_only: bool = False
    #: The release already uses ``layer0_release`` (then ``recognised`` is False).
    already_fixed: bool = False
    #: The op as called, e.g. ``get_output_kv_signal`` or ``ops.get_output_kv_signal``.
    op_function: str = ""
    consume: Optional[ast.FunctionDef] = field(default=None, compare=False, repr=False)
    register: Optional[ast.FunctionDef] = field(default=None, compare=False, repr=False)
    #: Every ``self.idx_cache_task_dict[...] = ...`` statement of ``_add_cache_task_thread``.
    task_stores: Tuple[ast.Assign, ...] = field(default=(), compare=False, repr=False)
    #: The import statements inside ``consume_signals`` (a rewrite keeps them: the op may come from one).
    local_imports: Tuple[ast.stmt, ...] = field(default=(), compare=False, repr=False)
    #: Names bound at module level (imports, assignments, definitions, also inside if/try blocks).
    module_names: FrozenSet[str] = frozenset()

    @property
    def cannot_race(self) -> bool:
        """The engine of this release waits for the messagers' registration report before it computes (release
        lines 2.4, 2.5, develop before #7724): the race this fix is about cannot occur, so the plugin stands aside
        (``docs/design/release-lines.md``, "Release 2.5": patching would only add a risk)."""
        return self.recognised and self.reports_finished_add

    def op_call(self, buffer: str = "buf", function: str = KV_SIGNAL_OP) -> str:
        """The op call with the branch's arguments after ``buffer`` (``function``: e.g. :attr:`op_function`)."""
        return f"{function}({', '.join([buffer] + [argument.source for argument in self.op_arguments])})"

    def kv_signal_op(self, consume_signals) -> Tuple[Callable[[], Callable], Callable[[Callable], None]]:
        """Where the running release's ``consume_signals`` (the original function) looks the kv-signal op up, as
        ``(get, set)``: the module of its local import (imported now, in the running messager), or its own module's
        globals. The plugin's ``consume_signals`` calls ``get()``; fault injection wraps the op with ``set``."""
        if self.op_import_module:
            module = importlib.import_module(self.op_import_module)
            return (lambda: getattr(module, KV_SIGNAL_OP)), (lambda op: setattr(module, KV_SIGNAL_OP, op))
        namespace = consume_signals.__globals__
        return (lambda: namespace[KV_SIGNAL_OP]), (lambda op: namespace.__setitem__(KV_SIGNAL_OP, op))

    def features(self) -> str:
        """One line: the op call and the release features found (status, the patch decision, commit messages)."""
        if not self.recognised:
            return "unrecognised"
        buffer = f"{PENDING_BUFFER} (#7872+)" if self.has_pending_buffer else "no pending buffer (pre-#7872)"
        registration = (
            f"{FINISH_ADD_BARRIER} (pre-#7724)" if self.reports_finished_add else f"no {FINISH_ADD_BARRIER} (#7724+)"
        )
        if self.waits_for_registration:
            send_loop = "send loop waits for registration (#7724+)"
        elif self.waits_for_registration_via_storage_only:
            send_loop = "send loop waits for registration only via storage (FD_PD_TRANSFER_VIA_STORAGE)"
        else:
            send_loop = "send loop does not wait for registration"
        return f"{self.op_call()}; {buffer}; {registration}; {send_loop}"


def unrecognised(reason: str, already_fixed: bool = False) -> TargetAnalysis:
    return TargetAnalysis(False, reason, already_fixed=already_fixed)


# ---- the shared rules ----


def _uses_upstreamed_package(node: ast.AST) -> bool:
    """Any name, attribute or import in ``node`` that refers to ``layer0_release``."""
    for child in ast.walk(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            names = [getattr(child, "module", None) or ""] + [alias.name for alias in child.names]
        else:
            names = [getattr(child, "id", None) or getattr(child, "attr", None) or ""]
        if any(UPSTREAMED_PACKAGE in name for name in names):
            return True
    return False


def _top_level_statements(statements: List[ast.stmt]) -> List[ast.stmt]:
    """Module-level statements, also those inside module-level if/try/with blocks."""
    found = []
    for node in statements:
        found.append(node)
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            nested = node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            nested += [statement for handler in getattr(node, "handlers", []) for statement in handler.body]
            found += _top_level_statements(nested)
    return found


def bound_names(statements) -> FrozenSet[str]:
    """Names the statements bind at their own level: imports, assignments, definitions."""
    names = set()
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {child.id for target in targets for child in ast.walk(target) if isinstance(child, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return frozenset(names)


def _op_calls(consume: ast.AST) -> List[ast.Call]:
    return [
        node
        for node in ast.walk(consume)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == KV_SIGNAL_OP or getattr(node.func, "attr", None) == KV_SIGNAL_OP)
    ]


def _mentions_storage_switch(test: ast.AST) -> bool:
    """Whether an ``if`` test refers to the storage transfer switch (a name, attribute or string, any case)."""
    for child in ast.walk(test):
        names = [getattr(child, "id", None), getattr(child, "attr", None)]
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            names.append(child.value)
        if any(isinstance(name, str) and STORAGE_SWITCH in name.lower() for name in names):
            return True
    return False


def _nodes(node: ast.AST, include_storage: bool):
    """``node`` and everything under it; without ``include_storage``, not what only the storage path runs: of an
    ``if`` (or ``x if c else y``) on the switch its ``else`` (its body when the test is ``not <switch>``)."""
    pending = [node]
    while pending:
        current = pending.pop()
        if not include_storage and isinstance(current, (ast.If, ast.IfExp)) and _mentions_storage_switch(current.test):
            negated = isinstance(current.test, ast.UnaryOp) and isinstance(current.test.op, ast.Not)
            kept = current.body if negated else current.orelse
            yield current.test
            pending += kept if isinstance(kept, list) else [kept]
            continue
        yield current
        pending += list(ast.iter_child_nodes(current))


#: Resolves a method name of the analysed class to its definitions (none: unknown or not Python source).
Resolver = Callable[[str], List[ast.AST]]


def _calls_from(roots: List[ast.AST], resolve: Resolver, include_storage: bool = False) -> List[ast.Call]:
    """Every call the ``roots`` make, also in the ``self.<method>(...)`` they call (transitively, through
    ``resolve``); without ``include_storage``, only the calls made outside the storage transfer branch."""
    calls: List[ast.Call] = []
    followed = set()
    pending = list(roots)
    while pending:
        for node in _nodes(pending.pop(), include_storage):
            if not isinstance(node, ast.Call):
                continue
            calls.append(node)
            function = node.func
            if (
                isinstance(function, ast.Attribute)
                and isinstance(function.value, ast.Name)
                and function.value.id == "self"
                and function.attr not in followed
            ):
                followed.add(function.attr)
                pending += resolve(function.attr)
    return calls


def _calls_method(calls: List[ast.Call], name: str) -> bool:
    """Whether one of ``calls`` is ``self.<name>(...)``."""
    return any(
        isinstance(call.func, ast.Attribute)
        and call.func.attr == name
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "self"
        for call in calls
    )


def _calls_barrier(calls: List[ast.Call], barrier: str) -> bool:
    """Whether one of ``calls`` is on the barrier (``....<barrier>.wait()``) or is the barrier itself."""
    return any(barrier in {getattr(node, "attr", None) for node in ast.walk(call.func)} for call in calls)


def _no_methods(name: str) -> List[ast.AST]:
    return []


def _stores_task(node: ast.AST) -> bool:
    return isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and ast.unparse(node.value) == TASK_DICT


def _analyse_methods(
    module: ast.Module, init: ast.AST, consume: ast.AST, register: ast.AST, resolve: Resolver = _no_methods
) -> TargetAnalysis:
    """The rules every target must meet, on the syntax trees of its three methods and of their module; ``resolve``
    gives the class's other methods (the send loop and what the methods call), for the release features."""
    top_level = _top_level_statements(module.body)
    top_imports = [node for node in top_level if isinstance(node, (ast.Import, ast.ImportFrom))]
    if any(_uses_upstreamed_package(node) for node in [consume, register] + top_imports):
        return unrecognised(ALREADY_FIXED, already_fixed=True)

    calls = _op_calls(consume)
    if len(calls) != 1:
        return unrecognised(f"expected one {KV_SIGNAL_OP} call in consume_signals, found {len(calls)}")
    call = calls[0]
    if len(call.args) < 3 or call.keywords or not all(OpArgument.evaluable(arg) for arg in call.args[1:]):
        return unrecognised(f"unexpected {KV_SIGNAL_OP} call: {ast.unparse(call)}")

    if not any(_stores_task(node) for node in ast.walk(register)):
        return unrecognised(
            f"_add_cache_task_thread does not store tasks by `{TASK_DICT}[...] = ...` (found 0 such statements)"
        )
    task_stores = tuple(
        node
        for node in ast.walk(register)
        if isinstance(node, ast.Assign) and any(_stores_task(target) for target in node.targets)
    )
    local_imports = tuple(node for node in ast.walk(consume) if isinstance(node, (ast.Import, ast.ImportFrom)))
    op_import_module = next(
        (
            node.module
            for node in local_imports
            if isinstance(node, ast.ImportFrom) and any(alias.name == KV_SIGNAL_OP for alias in node.names)
        ),
        None,
    )
    send_loop = resolve(SEND_LOOP)
    send_calls = _calls_from(send_loop, resolve)
    waits = _calls_method(send_calls, REGISTRATION_WAIT)
    return TargetAnalysis(
        True,
        "recognised",
        op_arguments=tuple(OpArgument(ast.unparse(arg)) for arg in call.args[1:]),
        op_import_module=op_import_module,
        has_pending_buffer=any(getattr(node, "attr", None) == PENDING_BUFFER for node in ast.walk(init)),
        reports_finished_add=_calls_barrier(_calls_from([register], resolve), FINISH_ADD_BARRIER),
        waits_for_registration=waits,
        waits_for_registration_via_storage_only=not waits
        and _calls_method(_calls_from(send_loop, resolve, include_storage=True), REGISTRATION_WAIT),
        op_function=ast.unparse(call.func),
        consume=consume,
        register=register,
        task_stores=task_stores,
        local_imports=local_imports,
        module_names=bound_names(top_level),
    )


# ---- a file: make-patch ----


def _definitions(cls: ast.ClassDef, name: str) -> List[ast.AST]:
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


def class_defines(cls: ast.ClassDef, name: str) -> bool:
    """Whether the class body defines method ``name`` anywhere (also conditionally)."""
    return bool(_definitions(cls, name))


def target_class_node(module: ast.Module) -> Optional[ast.ClassDef]:
    """The module's one top-level ``class CacheMessagerV1``, or None."""
    classes = [node for node in module.body if isinstance(node, ast.ClassDef) and node.name == TARGET_CLASS]
    return classes[0] if len(classes) == 1 else None


def analyse_source(source: str) -> TargetAnalysis:
    """Analyse the text of a ``cache_messager.py``: one ``CacheMessagerV1`` defining each method once, at class level.

    Never raises. The class must also use every attribute of :data:`~fastdeploy_pd_fix.target.USED_ATTRIBUTES`
    (code written against this file relies on them; a live class is checked on its instance instead)."""
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError) as error:
        return unrecognised(f"the source does not parse: {error}")
    classes = [node for node in module.body if isinstance(node, ast.ClassDef) and node.name == TARGET_CLASS]
    if len(classes) != 1:
        return unrecognised(f"expected one class {TARGET_CLASS}, found {len(classes)}")
    cls = classes[0]
    methods: Dict[str, ast.AST] = {}
    missing = []
    for name in ANALYSED_METHODS:
        found = _definitions(cls, name)
        if not found:
            missing.append(name)
        elif len(found) != 1 or found[0] not in cls.body:
            return unrecognised(f"{TARGET_CLASS}.{name} is defined conditionally or more than once")
        elif isinstance(found[0], ast.AsyncFunctionDef):
            return unrecognised(f"{TARGET_CLASS}.{name} is async")
        else:
            methods[name] = found[0]
    if missing:
        return unrecognised(f"missing methods {', '.join(missing)}")
    analysis = _analyse_methods(
        module,
        methods["__init__"],
        methods["consume_signals"],
        methods["_add_cache_task_thread"],
        functools.partial(_definitions, cls),
    )
    if not analysis.recognised:
        return analysis
    attributes = {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute)}
    unused = [name for name in USED_ATTRIBUTES if name not in attributes]
    if unused:
        return unrecognised(f"{TARGET_CLASS} does not use {', '.join(unused)}")
    return analysis


# ---- a live class: the plugin ----


def analyse_class(cls) -> TargetAnalysis:
    """Analyse a live ``CacheMessagerV1`` (never raises): the methods the interpreter runs, found by their code
    objects in the source of the module that defines them (also inside ``if`` blocks of a class body, and in
    base classes)."""
    try:
        missing = [name for name in ANALYSED_METHODS if not callable(getattr(cls, name, None))]
        if missing:
            return unrecognised(f"missing methods {', '.join(missing)}")
        modules: Dict[str, ast.Module] = {}  # file name -> its syntax tree, parsed once
        try:
            functions = {name: live_function(cls, name) for name in ANALYSED_METHODS}
            trees = {name: running_definition(function, modules) for name, function in functions.items()}
        except (OSError, TypeError, SyntaxError, ValueError) as error:
            if isinstance(error, SourceMismatch):
                return unrecognised(str(error))
            return unrecognised(f"source of the methods is not readable ({error})")
        module = modules[functions["consume_signals"].__code__.co_filename]

        def resolve(name: str) -> List[ast.AST]:
            """The running definition of the class's method ``name``; none when it has no readable source."""
            try:
                return [running_definition(live_function(cls, name), modules)]
            except Exception:
                return []

        return _analyse_methods(
            module, trees["__init__"], trees["consume_signals"], trees["_add_cache_task_thread"], resolve
        )
    except Exception as error:  # an unexpected shape must not break FastDeploy: the caller stands aside
        return unrecognised(f"check failed: {error!r}")
