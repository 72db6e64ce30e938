"""Command-line values that would make a tool run for ever, or fail only after its work, are refused at once."""

import argparse
import math

import pytest

from fastdeploy_pd_fix.arguments import positive_seconds
from fastdeploy_pd_fix.cli import main


@pytest.mark.parametrize("text", ["nan", "-1", "0", "inf", "3s", ""])
def test_positive_seconds_refuses_what_is_not_a_deadline(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a positive number of seconds"):
        positive_seconds(text)


def test_positive_seconds_takes_a_number_of_seconds():
    assert positive_seconds("2.5") == 2.5 and math.isfinite(positive_seconds("1e3"))


@pytest.mark.parametrize("deadline", ["nan", "-1"])
def test_demo_refuses_a_deadline_that_is_not_one(deadline, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--deadline", deadline])
    assert exit_info.value.code == 2
    assert "not a positive number of seconds" in capsys.readouterr().err


def test_verify_refuses_an_unwritable_json_path_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--quick", "--json-out", str(tmp_path / "missing" / "out.json")])
    assert exit_info.value.code == 2
    assert "no such directory" in capsys.readouterr().err
