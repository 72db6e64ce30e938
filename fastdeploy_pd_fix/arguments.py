"""The argument types and parser every command line of the package shares, so that a refusal reads the same in each:
``PROG: error: WHY`` on one line, exit :data:`EXIT_USAGE`."""

import argparse
import math
import os
import tempfile
from pathlib import Path

#: The exit code of a command that refused its arguments or could not do its work here (argparse's own).
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusal is one line on stderr, ``PROG: error: WHY``, exit :data:`EXIT_USAGE`: an
    operator's script reads one line per refusal (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _refuse_unless_writable_in(folder: Path, text: str) -> None:
    """Create and drop a temporary file in ``folder``: unlike permission bits, this also holds for root, ACLs and
    read-only mounts."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder} ({error.strerror})") from None


def output_file(text: str) -> str:
    """An argparse type for a file written after the work: refused now if it could not be written then."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory {path.parent.absolute()}")
    _refuse_unless_writable_in(path.parent, text)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return text


def output_folder(text: str) -> str:
    """An argparse type for a folder created (with its parents) and written after the work: refused now if it
    could not be then."""
    path = Path(text).expanduser().absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a folder")
    _refuse_unless_writable_in(existing, text)
    return text


def positive_seconds(text: str) -> float:
    """An argparse type for deadlines: a positive finite number of seconds (``nan`` would never end a run, and a
    negative one would call every run a hang)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def positive_int(text: str) -> int:
    """An argparse type for counts (``--tp``, ``--parallel``): a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value
