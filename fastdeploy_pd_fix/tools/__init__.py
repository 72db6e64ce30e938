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
