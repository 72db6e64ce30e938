"""A tensor-parallel rank's cache messager dies mid-transfer: the survivor blocks, and its watchdog says so.

What FastDeploy itself does then (protocol.md, fastdeploy-facts.md): the cross-rank barriers are
``threading.Barrier(nranks)`` objects in the engine's manager process, reached through proxies with no timeout, so
every surviving rank blocks forever in the next ``begin_send_cache_barrier.wait()`` or
``finish_send_cache_barrier.wait()`` it reaches (and its registration thread in the next ``cache_info_barrier``).
Nothing restarts the dead rank: the engine launched the messagers with ``subprocess.Popen`` and calls ``poll()``
only on the last one, once, while it waits at start-up for every rank's ``cache_ready_signal``. And
``get_finished_req`` waits until every rank has put its result for the round, so neither the requests in flight nor
any later one is ever reported finished: the prefill service hangs, without an error, until an operator restarts
it. With ``FD_PD_FIX_WATCHDOG_S`` set, each surviving rank then logs once, in its ``cache_messager_rank{R}.log``,
a WATCHDOG report soon after the deadline: the batch its send thread has held and for how long, the last batches
it queued with their ``seq_hash``, the layer-0 signals still waiting and the open registrations, and every
thread's stack, with the send thread parked in the barrier wait. The dead rank's log simply stops (no report), and
``fastdeploy-pd-fix diagnose`` finds no divergence between the ranks' sequences: together that tells the operator
it is a lost rank, not the ordering deadlock, and which rank to look at.

Here, in the stand-in's real rank processes, ``FD_STANDIN_EXIT_AFTER_BATCHES=1:2`` kills rank 1 (SIGKILL) right
after its send loop took its second batch, before that batch's ``begin_send_cache_barrier``. The harness keeps
watching the survivor (``watch_survivors``) until its deadline and then kills it.
"""

import re
import signal

from fastdeploy_pd_fix.standin.harness import run_scenario
from fastdeploy_pd_fix.tools.diagnose import diagnose

WATCHDOG_S = 0.5
HARNESS_DEADLINE_S = 3.0
# The watchdog polls every WATCHDOG_S / 4; what is above that is room for a loaded CI machine, not expected.
REPORT_WITHIN_S = 2.0


def test_surviving_rank_blocks_in_the_barrier_and_its_watchdog_reports_the_held_batch(tmp_path):
    env = {
        "FD_PD_FIX_MODE": "ordered",
        "FD_PD_FIX_WATCHDOG_S": str(WATCHDOG_S),
        "FD_STANDIN_EXIT_AFTER_BATCHES": "1:2",
    }
    result = run_scenario("s3", env=env, deadline_s=HARNESS_DEADLINE_S, workdir=tmp_path, watch_survivors=True)

    # Rank 1 died; rank 0 never finished: the harness killed it at the deadline (returncode None).
    assert result.outcome == "error", result.summary()
    assert result.returncodes == {0: None, 1: -signal.SIGKILL}, result.summary()
    assert "ranks [0] still running" in result.error and result.elapsed_s >= HARNESS_DEADLINE_S
    both = [[[0, 4], [1, 4]], [[0, 8]]]  # s3 in ordered mode: one batch per kv signal
    assert result.batches == {0: both, 1: both}
    assert result.finished == {0: ["B"], 1: ["B"]}  # A's final batch never got past begin_send_cache_barrier

    survivor, dead = result.logs[0], result.logs[1]
    assert "killing this rank after 2 batches" in dead and "WATCHDOG" not in dead
    report = survivor[survivor.index("fastdeploy_pd_fix WATCHDOG") :]
    assert survivor.count("fastdeploy_pd_fix WATCHDOG") == 1  # once per stall
    held = re.match(
        rf"fastdeploy_pd_fix WATCHDOG: stalled longer than {WATCHDOG_S}s: "
        r"the send thread has held batch \[\(0, 8\)\] for (?P<seconds>[0-9.]+)s",
        report,
    )
    assert held, report
    assert WATCHDOG_S <= float(held["seconds"]) < REPORT_WITHIN_S, report
    assert "recent batches (last 2 of 2):" in report
    assert re.search(r"#1 \[\(0, 4\), \(1, 4\)\] seq_hash=[0-9a-f]{8}\n  #2 \[\(0, 8\)\] seq_hash=", report)
    assert "waiting layer-0 signals: []" in report and "open registrations per slot: {}" in report
    assert "thread stacks:" in report
    send_thread = re.search(r"in wait\n.*in prefill_layerwise_send_cache_thread\n", report)
    assert send_thread, f"the send thread is not shown parked in a barrier wait:\n{report}"

    code, diagnosis = diagnose(tmp_path)
    assert code == 0 and diagnosis.startswith("none"), diagnosis
