"""Operator and developer tools: demo, preflight, diagnose, stress."""

import argparse
import math


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
