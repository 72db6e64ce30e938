"""The GPU e2e test's fault injection on the stand-in (real rank processes): an engine that does not wait for
registration (#7724 on), the same schedule on both ranks up to the registration's ``cache_info_barrier``, and
``FD_PD_FIX_INJECT=registration_after_barrier`` on rank 1 only. The injection alone decides which side of the race
each rank is on: rank 0 stores its tasks right after the barrier, rank 1 sleeps before storing them while its layer-0
signals arrive. Without the fix (observe mode: the release's own methods run) the release hangs where it lacks the
fix for that case; with the plugin every request finishes, the batches are the same on both ranks, and the race
counter is above zero on rank 1 only.

The schedules: rank 0 gets its signals only after its read is stored (``reg<N>``); rank 1 as soon as its read passed
the barrier (``reg<N>@barrier``), which is the window the injection holds open. The sleep is the injection under test,
not the test's synchronisation: the rank-1 signals are delivered at once (a handshake), and the delay
(:data:`DELAY_MS`) is a thousand times what the consume thread needs to take them.
"""

import re

import pytest
from e2e.fastdeploy_servers import ASYMMETRIC_STAGE, DEFAULT_INJECT
from e2e.orchestration import EARLY_SIGNAL
from support.installed import require_plugin_installed

from fastdeploy_pd_fix import config
from fastdeploy_pd_fix.standin.fastdeploy.pd_fix_standin.script import ScriptedStreams
from fastdeploy_pd_fix.standin.harness import run_many
from fastdeploy_pd_fix.standin.scenarios import SCENARIOS

pytestmark = pytest.mark.timeout(300)

INJECTED_RANK = int(re.search(r"rank=(\d+)", DEFAULT_INJECT).group(1))
#: Longer than the GPU run's 300 ms: the stand-in's two ranks share two cores with the rest of the run.
DELAY_MS = 1500
INJECT = f"{ASYMMETRIC_STAGE}:rank={INJECTED_RANK}:delay_ms={DELAY_MS}"
DEADLINE_S = 8.0  # after every rank is ready; a finishing run needs two delays (s1) and well under a second more
#: Layer-0 tasks whose slot had no stored registration on the delayed rank: s1's B; s2's two chunks of A.
EARLY_TASKS = {"s1": 1, "s2": 2}


def symmetric_until_the_barrier(name: str) -> dict:
    """Scenario ``name``'s streams with rank 0's schedule on every rank, the injected rank's reads acknowledged at
    their barrier."""
    scenario = {key: SCENARIOS[name][key] for key in ("signals", "registrations")}
    schedule = SCENARIOS[name]["schedules"][0]
    delayed = [f"{token}@barrier" if token.startswith("reg") else token for token in schedule]
    scenario["schedules"] = [delayed if rank == INJECTED_RANK else schedule for rank in range(2)]
    scenario["name"] = f"{name} with {ASYMMETRIC_STAGE} on rank {INJECTED_RANK}"
    return scenario


#: (scenario the injection turns it into, release variant, plugin mode) -> expected outcome.
RUNS = {
    # s1's streams (one signal [A final, B final]): the seed's hang on a release without #8034 ...
    ("s1", "7872", config.OBSERVE): "hang",
    ("s1", "7872", config.ORDERED): "finished",
    # ... which #8034 fixes,
    ("s1", "8034", config.OBSERVE): "finished",
    ("s1", "8034", config.ORDERED): "finished",
    # but not s2's (two chunks of A, both signalled before A is stored on rank 1).
    ("s2", "8034", config.OBSERVE): "hang",
    ("s2", "8034", config.ORDERED): "finished",
}


@pytest.fixture(scope="module")
def results():
    require_plugin_installed()
    jobs = [
        dict(
            scenario=symmetric_until_the_barrier(name),
            release=release,
            with_7724=True,
            mode=mode,
            deadline_s=DEADLINE_S,
            env={config.ENV_INJECT: INJECT},
        )
        for name, release, mode in RUNS
    ]
    return dict(zip(RUNS, run_many(jobs, parallel=3)))


def describe(result) -> str:
    return result.summary() + "".join(f"\n--- rank {rank} ---\n{text}" for rank, text in result.logs.items())


def early_signals(result, rank: int) -> int:
    return len(EARLY_SIGNAL.findall(result.logs[rank]))


@pytest.mark.parametrize("run", RUNS, ids=lambda run: "-".join(run))
def test_the_injection_alone_decides_the_outcome(results, run):
    result = results[run]
    assert result.outcome == RUNS[run], describe(result)
    assert f"registration delayed by {DELAY_MS / 1000}s after cache_info_barrier on rank {INJECTED_RANK}" in (
        result.logs[INJECTED_RANK]
    ), describe(result)
    if result.outcome == "finished":
        assert result.same_batches_on_all_ranks(), describe(result)
        assert result.ground_truth_violations() == 0, describe(result)


@pytest.mark.parametrize("name", ["s1", "s2"])
def test_with_the_plugin_the_race_counter_is_above_zero_on_the_delayed_rank_only(results, name):
    result = results[(name, "8034", config.ORDERED)]
    assert early_signals(result, INJECTED_RANK) == EARLY_TASKS[name], describe(result)
    assert early_signals(result, 1 - INJECTED_RANK) == 0, describe(result)


def test_a_read_marked_at_barrier_lets_the_next_event_come_once_its_barrier_returned():
    streams = ScriptedStreams()
    events = [("reg", 0), ("sig", 0), ("reg", 1), ("sig", 1)]
    streams.activate(events, [[[0, 0, 4]], [[1, 0, 4]]], [["read 0"], ["read 1"]], at_barrier={0})
    assert streams.next_cache_infos() == ["read 0"]
    assert streams.next_kv_signal(block=False) is None  # the read is neither processed nor through its barrier
    streams.cache_info_barrier_passed()
    assert streams.next_kv_signal(block=False) == [[0, 0, 4]]
    assert streams.next_kv_signal(block=False) is None  # the consume loop is back: sig0 acknowledged, reg1 is next
    assert streams.next_cache_infos() == ["read 1"]
    streams.cache_info_barrier_passed()  # reg1 is not marked: its barrier does not acknowledge it
    assert streams.next_kv_signal(block=False) is None
