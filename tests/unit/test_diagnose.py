"""``diagnose``: the first divergence of the ranks' batch sequences, read from their cache messager logs."""

import pytest

from fastdeploy_pd_fix.cli import main as cli_main
from fastdeploy_pd_fix.core.messager_step import BatchJournal, next_sequence_hash
from fastdeploy_pd_fix.tools.diagnose import diagnose, first_divergence


def test_sequence_hash_depends_on_order():
    a, b = [(0, 4)], [(1, 4)]
    assert next_sequence_hash(next_sequence_hash("", a), b) != next_sequence_hash(next_sequence_hash("", b), a)


def write_rank_log(directory, rank, batches):
    digest, lines = "", ["2026-11-25 INFO something else"]
    for number, batch in enumerate(batches, 1):
        digest = next_sequence_hash(digest, batch)
        lines.append(f"2026-11-25 INFO fastdeploy_pd_fix: queued batch #{number} {batch} seq_hash={digest}")
    (directory / f"cache_messager_rank{rank}.log").write_text("\n".join(lines) + "\n")


def test_diagnose_finds_first_divergence(tmp_path, capsys):
    write_rank_log(tmp_path, 0, [[(0, 4), (1, 4)]])
    write_rank_log(tmp_path, 1, [[(0, 4)], [(1, 4)]])
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1" in report
    assert "rank 0: [(0, 4), (1, 4)]" in report and "rank 1: [(0, 4)]" in report
    assert cli_main(["diagnose", str(tmp_path)]) == 1 and "first divergence" in capsys.readouterr().out


def test_diagnose_none_when_sequences_agree_even_if_one_rank_is_behind(tmp_path):
    write_rank_log(tmp_path, 0, [[(0, 4)], [(1, 4)]])
    write_rank_log(tmp_path, 1, [[(0, 4)]])
    code, report = diagnose(tmp_path)
    assert code == 0 and report.startswith("none") and "rank 0: 2 batches, rank 1: 1 batches" in report


@pytest.mark.parametrize("ranks", [(), (0,)])
def test_diagnose_without_comparable_logs(tmp_path, ranks):
    for rank in ranks:
        write_rank_log(tmp_path, rank, [[(0, 4)]])
    assert diagnose(tmp_path)[0] == 2


@pytest.mark.parametrize("prefix", ["fastdeploy_pd_fix: ", "layer0_release: "])
def test_diagnose_reads_what_the_core_journal_logs_for_the_plugin_and_the_upstreamed_fix(tmp_path, prefix):
    for rank, batches in ((0, [[(0, 4), (1, 4)]]), (1, [[(0, 4)], [(1, 4)]])):
        lines = []
        journal = BatchJournal(lines.append, prefix)
        for batch in batches:
            journal.record(batch)
        log = "".join(f"2026-11-25 INFO 1234 MainThread {line}\n" for line in lines)
        (tmp_path / f"cache_messager_rank{rank}.log").write_text(log)
    code, report = diagnose(tmp_path)
    assert code == 1 and "first divergence at batch #1 (rank 0: 1 batches, rank 1: 2 batches)" in report
    assert "rank 0: [(0, 4), (1, 4)]" in report and "rank 1: [(0, 4)]" in report


def test_first_divergence_of_empty_input():
    assert first_divergence({}) is None
