"""The engine side of the branch-specific part: the slot-lifecycle notices, wired in as the plugin wires them at run
time (:mod:`fastdeploy_pd_fix.plugin.engine.patch`), by line insertion into the branch's own two engine files.

* ``resource_manager_v1.py``: ``ResourceManagerV1`` imports ``layer0_release.adapters.engine_notices``; the first
  statement of ``recycle_abort_task`` puts ``engine_notices.abort_batches(...)`` (the abort, then its fence), the first
  statement of ``add_request_in_p`` puts ``[engine_notices.orphan_batch(...)]``, each through one new method,
  ``_layer0_release_put``, which puts every non-empty batch into the mailbox the connector gave the resource manager
  (nothing without one). Both calls come before the original body, as the plugin's wrappers run before the originals.
* ``splitwise_connector.py``: ``SplitwiseConnector`` imports ``layer0_release.adapters.engine_notices`` too; its
  ``__init__``, right after it has stored both the engine worker queue and the resource manager, gives the resource
  manager that queue as ``layer0_release_mailbox`` and, on the prefill role, makes the queue's first batch start with
  the engine's announcement (``engine_notices.AnnouncedPut``), so that every messager logs whether the engine puts
notices.
Every public ``ResourceManagerV1`` we read declares ``add_request_in_p(self, requests: list[Request])``, so
``orphan_batch``'s refusal of an iterator (a TypeError, which the plugin catches) does not arise there.

Both files are edited or neither (a half-wired engine puts nothing). A file that is missing or not recognised is
reported with the reason, and make-patch then commits the messager side alone and says so. Every other byte stays.
"""

from __future__ import annotations

import ast
from typing import Dict, List, Optional, Tuple

from fastdeploy_pd_fix.target import (
    CONNECTOR_CLASS,
    CONNECTOR_MAILBOX,
    CONNECTOR_MODULE,
    CONNECTOR_RESOURCE_MANAGER,
    MAILBOX_PUT,
    RESOURCE_MANAGER_CLASS,
    RESOURCE_MANAGER_METHODS,
    RESOURCE_MANAGER_MODULE,
    UPSTREAMED_PACKAGE,
)
from fastdeploy_pd_fix.upstream.rewrite import alone_on_its_lines, first_statement, split_lines

RESOURCE_MANAGER_PATH = RESOURCE_MANAGER_MODULE.replace(".", "/") + ".py"
CONNECTOR_PATH = CONNECTOR_MODULE.replace(".", "/") + ".py"
ENGINE_PATHS = (RESOURCE_MANAGER_PATH, CONNECTOR_PATH)
#: The method the patch adds to ``ResourceManagerV1``, and the attribute the connector gives it.
PUT_METHOD = "_layer0_release_put"
#: Who announces engine notices in an upstreamed FastDeploy (the messagers log it).
ANNOUNCER = UPSTREAMED_PACKAGE
MAILBOX_ATTRIBUTE = "layer0_release_mailbox"
IMPORTED_MODULE = f"fastdeploy.cache_manager.{UPSTREAMED_PACKAGE}.adapters"
IMPORT = f"from {IMPORTED_MODULE} import engine_notices"
NEW_NAMES = (PUT_METHOD, MAILBOX_ATTRIBUTE, UPSTREAMED_PACKAGE)

PUT_METHOD_TEXT = f'''\
def {PUT_METHOD}(self, batches):
    """Put slot-lifecycle notices for the prefill cache messagers (fastdeploy/cache_manager/{UPSTREAMED_PACKAGE}), one
    non-empty batch at a time, into the cache-info mailbox SplitwiseConnector gave this resource manager. A put
    returns once every messager rank has read the previous batch; with no mailbox (not a prefill instance with a
    connector) nothing is put."""
    mailbox = getattr(self, "{MAILBOX_ATTRIBUTE}", None)
    for batch in batches if mailbox is not None else []:
        if batch:
            mailbox.{MAILBOX_PUT}(batch)
'''


class EngineNotRecognised(Exception):
    """Why the engine side is not wired (the messager side still is)."""


def _class(tree: ast.Module, name: str, path: str) -> ast.ClassDef:
    found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    if len(found) != 1:
        raise EngineNotRecognised(f"{path} defines {len(found)} top-level class {name}")
    return found[0]


def _method(cls: ast.ClassDef, name: str, path: str) -> ast.FunctionDef:
    found = [node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == name]
    if len(found) != 1:
        raise EngineNotRecognised(f"{path}: {cls.name} defines {len(found)} method {name}")
    return found[0]


def _parse(source: Optional[str], path: str) -> Tuple[ast.Module, List[str]]:
    if source is None:
        raise EngineNotRecognised(f"the base has no {path}")
    taken = [name for name in NEW_NAMES if name in source]
    if taken:
        raise EngineNotRecognised(f"{path} already mentions {', '.join(taken)}")
    try:
        return ast.parse(source), split_lines(source)
    except SyntaxError as error:
        raise EngineNotRecognised(f"{path} does not parse: {error}") from error


def _newline(lines: List[str]) -> str:
    return "\r\n" if lines and lines[0].endswith("\r\n") else "\n"


def _insert_first(lines: List[str], method: ast.FunctionDef, statement: str, path: str) -> Tuple[int, List[str]]:
    first = first_statement(method)
    if not alone_on_its_lines(lines, first):
        raise EngineNotRecognised(f"{path}: the first statement of {method.name} shares its line with other code")
    indent = lines[first.lineno - 1][: first.col_offset]
    return first.lineno, [f"{indent}{statement}{_newline(lines)}"]


def _apply(lines: List[str], insertions: List[Tuple[int, List[str]]]) -> str:
    """Insert each block before its (1-based) line, bottom-up so that the line numbers stay valid."""
    for line, block in sorted(insertions, key=lambda insertion: insertion[0], reverse=True):
        lines[line - 1 : line - 1] = block
    patched = "".join(lines)
    ast.parse(patched)  # never write a file that does not parse
    return patched


def _import_line(tree: ast.Module, path: str) -> int:
    """Where our import goes, in isort's order: before the first top-level ``from fastdeploy...`` import that sorts
    after it, else after the last top-level import."""
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    if not imports:
        raise EngineNotRecognised(f"{path} has no top-level import to put ours beside")
    later = [
        node
        for node in imports
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("fastdeploy")
        and node.module > IMPORTED_MODULE
    ]
    return later[0].lineno if later else imports[-1].end_lineno + 1


def patch_resource_manager(source: Optional[str]) -> str:
    tree, lines = _parse(source, RESOURCE_MANAGER_PATH)
    cls = _class(tree, RESOURCE_MANAGER_CLASS, RESOURCE_MANAGER_PATH)
    newline = _newline(lines)
    insertions = [(_import_line(tree, RESOURCE_MANAGER_PATH), [IMPORT + newline])]
    calls = {
        "recycle_abort_task": "{put}(engine_notices.abort_batches(self, {0}, next(engine_notices.FENCE_SERIALS)))",
        "add_request_in_p": "{put}([engine_notices.orphan_batch(self, {0})])",
    }
    for name, leading in RESOURCE_MANAGER_METHODS.items():
        method = _method(cls, name, RESOURCE_MANAGER_PATH)
        parameters = tuple(argument.arg for argument in method.args.posonlyargs + method.args.args)
        if parameters[: len(leading)] != leading:
            raise EngineNotRecognised(f"{RESOURCE_MANAGER_PATH}: {name}({', '.join(parameters)}) is not {leading}")
        statement = calls[name].format(leading[1], put=f"self.{PUT_METHOD}")
        insertions.append(_insert_first(lines, method, statement, RESOURCE_MANAGER_PATH))
    last = cls.body[-1]
    indent = lines[cls.body[0].lineno - 1][: cls.body[0].col_offset]
    method_lines = [(indent + line if line else "") + newline for line in PUT_METHOD_TEXT.rstrip("\n").split("\n")]
    insertions.append((last.end_lineno + 1, [newline, *method_lines]))
    return _apply(lines, insertions)


def _stores_attribute(statement: ast.stmt, attribute: str) -> bool:
    targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
    return any(
        isinstance(target, ast.Attribute)
        and target.attr == attribute
        and isinstance(target.value, ast.Name)
        and target.value.id == "self"
        for target in targets
    )


def patch_connector(source: Optional[str]) -> str:
    tree, lines = _parse(source, CONNECTOR_PATH)
    init = _method(_class(tree, CONNECTOR_CLASS, CONNECTOR_PATH), "__init__", CONNECTOR_PATH)
    stores = {}
    for attribute in (CONNECTOR_MAILBOX, CONNECTOR_RESOURCE_MANAGER):
        found = [statement for statement in init.body if _stores_attribute(statement, attribute)]
        if len(found) != 1:
            raise EngineNotRecognised(
                f"{CONNECTOR_PATH}: __init__ stores self.{attribute} {len(found)} times at its top level"
            )
        stores[attribute] = found[0]
    last = max(stores.values(), key=lambda statement: statement.end_lineno)
    if not alone_on_its_lines(lines, last):
        raise EngineNotRecognised(f"{CONNECTOR_PATH}: `{ast.unparse(last)}` shares its line with other code")
    indent, newline = lines[last.lineno - 1][: last.col_offset], _newline(lines)
    queue, manager = f"self.{CONNECTOR_MAILBOX}", f"self.{CONNECTOR_RESOURCE_MANAGER}"
    block = [
        f"{indent}# The prefill cache messagers' slot-lifecycle notices go into this mailbox ({UPSTREAMED_PACKAGE})."
        + newline,
        f"{indent}if {manager} is not None:{newline}",
        f"{indent}    {manager}.{MAILBOX_ATTRIBUTE} = {queue}{newline}",
        f"{indent}    if engine_notices.splitwise_role({manager}) == engine_notices.PREFILL_ROLE:{newline}",
        f"{indent}        put = {queue}.{MAILBOX_PUT}{newline}",
        f'{indent}        {queue}.{MAILBOX_PUT} = engine_notices.AnnouncedPut(put, "{ANNOUNCER}"){newline}',
    ]
    return _apply(lines, [(_import_line(tree, CONNECTOR_PATH), [IMPORT + newline]), (last.end_lineno + 1, block)])


def patch_engine(sources: Dict[str, Optional[str]]) -> Dict[str, str]:
    """The two engine files with the notices wired in (path -> text), from the base's texts (None: missing); or
    :class:`EngineNotRecognised` with the first reason found."""
    return {
        RESOURCE_MANAGER_PATH: patch_resource_manager(sources.get(RESOURCE_MANAGER_PATH)),
        CONNECTOR_PATH: patch_connector(sources.get(CONNECTOR_PATH)),
    }
