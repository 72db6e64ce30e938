"""Render a release-specific copy of the stand-in: the tree one FastDeploy release branch would hold.

The stand-in's ``CacheMessagerV1`` defines the methods that differ between releases inside ``if RELEASE == ...:``,
``if WITH_7724:`` and ``if KV_SIGNAL_OP_ARGS == ...:`` blocks of its class body, chosen at import time. A FastDeploy
branch has exactly one version of each method, at class level. :func:`render_standin` copies the stand-in's
``fastdeploy`` package and resolves those blocks with the syntax tree for one variant, so that the rendered
``cache_messager.py`` has the shape of that release (what ``make-patch`` and its tests work on). Everything else in
the tree is copied as is. Test-only (the make-patch and analysis tests); from the repository root:

    python tests/support/render.py DEST --release 8034 --with-7724 --op-args 4
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from fastdeploy_pd_fix.standin import STANDIN_ROOT
from fastdeploy_pd_fix.standin.scenarios import RELEASES

CACHE_MESSAGER = Path("fastdeploy", "cache_manager", "cache_messager.py")
#: The names the class-body conditions may use, bound to the variant at render time.
VARIANT_NAMES = ("RELEASE", "WITH_7724", "KV_SIGNAL_OP_ARGS")


def _lines(text: str) -> List[str]:
    """Lines with their ``\\n`` kept, split the way the syntax tree counts them."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _is_variant_condition(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    names = {child.id for child in ast.walk(node.test) if isinstance(child, ast.Name)}
    return bool(names) and names <= set(VARIANT_NAMES)


def _first_variant_condition(tree: ast.Module) -> Optional[ast.If]:
    """The first ``if <variant condition>:`` statement of any class body (nested ones come up in later passes)."""
    conditions = [
        statement
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        for statement in node.body
        if _is_variant_condition(statement)
    ]
    return min(conditions, key=lambda node: node.lineno, default=None)


def _holds(test: ast.expr, variant: dict):
    """The value of a variant condition: names of :data:`VARIANT_NAMES`, constants, comparisons, not/and/or."""
    if isinstance(test, ast.Name):
        return variant[test.id]
    if isinstance(test, ast.Constant):
        return test.value
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return not _holds(test.operand, variant)
    if isinstance(test, ast.BoolOp):
        values = [_holds(value, variant) for value in test.values]
        return all(values) if isinstance(test.op, ast.And) else any(values)
    if isinstance(test, (ast.Tuple, ast.List)):
        return [_holds(element, variant) for element in test.elts]
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, right = _holds(test.left, variant), _holds(test.comparators[0], variant)
        compare = {ast.Eq: left == right, ast.NotEq: left != right}
        if isinstance(test.ops[0], (ast.In, ast.NotIn)):
            return (left in right) == isinstance(test.ops[0], ast.In)
        if type(test.ops[0]) in compare:
            return compare[type(test.ops[0])]
    raise ValueError(f"unsupported variant condition: {ast.unparse(test)}")


def _chosen_lines(lines: List[str], condition: ast.If, variant: dict) -> List[str]:
    """The source lines of the branch ``variant`` selects, dedented to the level of the ``if`` statement."""
    if _holds(condition.test, variant):
        chosen, header = condition.body, condition.lineno
    else:
        chosen, header = condition.orelse, condition.body[-1].end_lineno
        is_elif = len(chosen) == 1 and lines[chosen[0].lineno - 1].lstrip().startswith("elif")
        if is_elif and _is_variant_condition(chosen[0]):
            return _chosen_lines(lines, chosen[0], variant)
    if not chosen:
        return []
    first = chosen[0]
    start = min([first.lineno] + [decorator.lineno for decorator in getattr(first, "decorator_list", [])]) - 1
    while start - 1 >= header and lines[start - 1].strip().startswith("#"):
        start -= 1  # keep the comment lines that introduce the chosen branch
    dedent = first.col_offset - condition.col_offset
    chosen_lines = []
    for line in lines[start : chosen[-1].end_lineno]:
        indent = len(line) - len(line.lstrip(" "))
        chosen_lines.append(line[min(indent, dedent) :])
    return chosen_lines


def render_cache_messager(source: str, release: str, with_7724: bool = False, op_args: int = 3) -> str:
    """``cache_messager.py`` of one release: every variant condition of a class body replaced by its chosen branch.

    Conditions are resolved one at a time, top-down, re-parsing after each, so that an ``elif`` chain or a
    condition nested in a chosen branch is resolved too. Only lines of the resolved statements change.
    """
    if release not in RELEASES:
        raise ValueError(f"release {release!r}: expected one of {', '.join(RELEASES)}")
    if op_args not in (3, 4):
        raise ValueError(f"op_args {op_args!r}: expected 3 or 4")
    variant = {"RELEASE": release, "WITH_7724": bool(with_7724), "KV_SIGNAL_OP_ARGS": op_args}
    while True:
        tree = ast.parse(source)
        condition = _first_variant_condition(tree)
        if condition is None:
            return source
        lines = _lines(source)
        replacement = _chosen_lines(lines, condition, variant)
        before, after = lines[: condition.lineno - 1], lines[condition.end_lineno :]
        if not replacement and before and after and not before[-1].strip() and not after[0].strip():
            after = after[1:]  # the whole block went away: keep a single blank line where it was
        source = "".join(before + replacement + after)


def render_standin(dest, release: str, with_7724: bool = False, op_args: int = 3) -> Path:
    """Write the stand-in's ``fastdeploy`` package, rendered for one variant, into ``dest``; return ``dest``.

    ``dest`` then looks like the root of a FastDeploy checkout (``dest/fastdeploy/cache_manager/...``) and can be
    given to :func:`fastdeploy_pd_fix.standin.harness.run_scenario` as ``standin_root``.
    """
    dest = Path(dest)
    shutil.copytree(
        STANDIN_ROOT / "fastdeploy", dest / "fastdeploy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    target = dest / CACHE_MESSAGER
    source = target.read_text(encoding="utf-8")
    target.write_text(render_cache_messager(source, release, with_7724, op_args), encoding="utf-8")
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/support/render.py", description=__doc__)
    parser.add_argument("dest", help="directory to write the rendered tree into (fastdeploy/ must not exist yet)")
    parser.add_argument("--release", choices=RELEASES, required=True)
    parser.add_argument("--with-7724", action="store_true")
    parser.add_argument("--op-args", type=int, choices=(3, 4), default=3)
    args = parser.parse_args(argv)
    root = render_standin(args.dest, args.release, args.with_7724, args.op_args)
    print(root / CACHE_MESSAGER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
