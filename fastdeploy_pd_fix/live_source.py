"""The source of a live class's methods, for :func:`fastdeploy_pd_fix.analysis.analyse_class`.

A method is found by its code object in the source of the module that defines it: the ``def`` whose name, first line
and parameters match, so that a file replaced on disk after the module was compiled is not taken for the running code
(:class:`SourceMismatch`). Nothing here runs the class's code.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import sys
from typing import Dict


class SourceMismatch(ValueError):
    """The source found for a method is not the code the interpreter runs (a file replaced on disk, say)."""


def module_source(function) -> str:
    """The source of the module that defines ``function``: ``inspect.getsource`` of the module, or the lines
    ``linecache`` holds for the function's file (a ``__main__`` without a readable file)."""
    module = sys.modules.get(function.__module__)
    if module is not None:
        try:
            return inspect.getsource(module)
        except (OSError, TypeError):
            pass
    lines = linecache.getlines(function.__code__.co_filename)
    if not lines:
        raise OSError(f"no source for {function.__qualname__} ({function.__code__.co_filename})")
    return "".join(lines)


def _first_line(node: ast.AST) -> int:
    return min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])


def running_definition(function, modules: Dict[str, ast.Module]) -> ast.FunctionDef:
    """The ``def`` that ``function`` was compiled from, in the syntax tree of its module's source (parsed once per
    file into ``modules``, keyed by file name): its name, first line and parameters match."""
    code = function.__code__
    if code.co_filename not in modules:
        modules[code.co_filename] = ast.parse(module_source(function))
    parameters = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    for node in ast.walk(modules[code.co_filename]):
        if (
            isinstance(node, ast.FunctionDef)
            and node.name == code.co_name
            and _first_line(node) == code.co_firstlineno
        ):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if [argument.arg for argument in arguments] == parameters:
                return node
    raise SourceMismatch(f"the source on disk of {function.__qualname__} does not match the running code")


def live_function(cls, name: str):
    """The function the interpreter runs for ``cls.<name>``; of a patched method, its original."""
    function = inspect.unwrap(getattr(cls, name))
    if not inspect.isfunction(function):
        raise TypeError(f"{cls.__qualname__}.{name} is not a Python function")
    return function
