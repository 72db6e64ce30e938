"""The race families' rank model for the explorer (:mod:`.explorer`): the signal and registration threads.

Each delivers its stream's next event (a layer-0 kv signal, a completed registration) to the release policy; the
send thread sends every batch the moment it is released, reading the registration of its slot from the modelled
``idx_cache_task_dict`` (:mod:`.workloads`: a per-slot FIFO or upstream's plain dict). The interleavings of a rank
are the merges of its two streams; the findings of each release and drop against the workload's ground truth are
:mod:`.checks`'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from fastdeploy_pd_fix.engine_history.streams import Workload
from fastdeploy_pd_fix.policy.release import Batch, Released, ReleasePolicy, Task, policy_after_first_read
from fastdeploy_pd_fix.verify.barriers import BEGIN, FINISH, Wait
from fastdeploy_pd_fix.verify.checks import CRASH, drop_finding, end_findings, release_finding
from fastdeploy_pd_fix.verify.explorer import OutcomeKey, RankExploration, explore
from fastdeploy_pd_fix.verify.models import clone_policy, make_policy, policy_snapshot
from fastdeploy_pd_fix.verify.workloads import (
    FIFO,
    REGISTRATION_EVENT,
    SIGNAL_EVENT,
    SlotRegistrations,
    batch_bindings,
    deliver,
    registered_needs,
    send_task,
)


@dataclass
class RankRun:
    """The state of one rank after a prefix of a merge: the release policy, the send-thread model and outputs."""

    policy: ReleasePolicy
    slot_registrations: SlotRegistrations  # modelled idx_cache_task_dict (see workloads.py)
    unmatched: Dict[int, Tuple[Tuple[int, str, int], ...]]  # slot -> delivered tasks (n, origin, signal index)
    fed: frozenset  # request ids whose registration was delivered
    signals_fed: int = 0
    registrations_fed: int = 0
    batches: Tuple[Batch, ...] = ()
    drops: Tuple[Task, ...] = ()
    waits: Tuple[Wait, ...] = ()
    findings: frozenset = frozenset()
    released: Released = field(default_factory=Released)  # by the last event (for replays; not part of the state)

    def branch(self) -> "RankRun":
        return RankRun(
            clone_policy(self.policy),
            dict(self.slot_registrations),
            dict(self.unmatched),
            self.fed,
            self.signals_fed,
            self.registrations_fed,
            self.batches,
            self.drops,
            self.waits,
            self.findings,
        )


class RaceRank:
    """One rank of a race workload: the :class:`~.explorer.RankModel` of the signal and registration threads."""

    def __init__(self, workload: Workload, mode: str, slot_model: str = FIFO):
        self.workload = workload
        self.mode = mode
        self.slot_model = slot_model

    def start(self) -> RankRun:
        return RankRun(make_policy(self.mode), {}, {}, frozenset())

    def enabled(self, run: RankRun) -> Tuple[str, ...]:
        signals = (SIGNAL_EVENT,) if run.signals_fed < len(self.workload.signals) else ()
        registrations = (REGISTRATION_EVENT,) if run.registrations_fed < len(self.workload.registrations) else ()
        return signals + registrations

    def key(self, run: RankRun) -> tuple:
        return (
            run.signals_fed,
            policy_snapshot(run.policy),
            tuple(run.slot_registrations.items()),
            tuple(run.unmatched.items()),
            run.batches,
            run.drops,
            run.waits,
            run.findings,
        )

    def step(self, run: RankRun, event: str) -> RankRun:
        """Deliver the next event of one stream to a copy of ``run``."""
        workload = self.workload
        child = run.branch()
        try:
            if event == SIGNAL_EVENT:
                index = child.signals_fed
                child.signals_fed += 1
                for (slot, _, prefilled_token_num), origin in zip(workload.signals[index], workload.origins[index]):
                    child.unmatched[slot] = child.unmatched.get(slot, ()) + ((prefilled_token_num, origin, index),)
            else:
                index = child.registrations_fed
                child.registrations_fed += 1
                child.fed = child.fed | {workload.registrations[index].request_id}
                if index == 0:  # the rank learns whether the engine announced its notices (release rule 10)
                    registered = registered_needs(child.slot_registrations)
                    child.policy, handed_over = policy_after_first_read(child.policy, workload.announced, registered)
                    _record(child, handed_over, workload)
            child.released = deliver(child.policy, workload, event, index, child.slot_registrations, self.slot_model)
        except Exception as error:  # a crash on valid input is itself a finding
            child.findings = child.findings | {(CRASH, f"{type(error).__name__}: {error}")}
            return child
        _record(child, child.released, workload)
        return child

    def outcome(self, run: RankRun) -> OutcomeKey:
        findings = end_findings(run.findings, run.policy.waiting_signals(), run.unmatched, self.workload)
        return (run.batches, run.drops, run.waits, findings)

    def describe(self, position: int, before: RankRun, event: str, after: RankRun) -> dict:
        """What one event was and what the rank released on it."""
        workload = self.workload
        if event == SIGNAL_EVENT:
            index = before.signals_fed
            what = {"event": "signal", "index": index, "tasks": [list(t) for t in workload.signals[index]]}
        else:
            index = before.registrations_fed
            registration = workload.registrations[index]
            what = {
                "event": "registration",
                "index": index,
                "request_id": registration.request_id,
                "slot": registration.slot,
                "need_prefill_tokens": registration.need_prefill_tokens,
            }
        what["step"] = position
        what["released"] = [[list(task) for task in batch] for batch in after.released.batches]
        what["dropped"] = [[drop.slot, drop.prefilled_token_num, drop.reason] for drop in after.released.drops]
        return what


def _match_origin(run: RankRun, slot: int, prefilled_token_num: int) -> Optional[str]:
    """Which delivered task a released or dropped one is: the earliest unmatched one with that slot and number."""
    entries = run.unmatched.get(slot, ())
    for position, (number, origin, _) in enumerate(entries):
        if number == prefilled_token_num:
            run.unmatched[slot] = entries[:position] + entries[position + 1 :]
            return origin
    return None


def _record(run: RankRun, released: Released, workload: Workload) -> None:
    """Append released batches and drops, derive the barrier waits, and note per-rank findings."""
    findings = set(run.findings)
    waits = list(run.waits)
    for number, batch in enumerate(released.batches):
        waits.append(Wait(BEGIN))
        for (slot, prefilled_token_num), bound in zip(batch, batch_bindings(released, number)):
            origin = _match_origin(run, slot, prefilled_token_num)
            owner = send_task(run.slot_registrations, slot, prefilled_token_num, bound)
            finding = release_finding(slot, prefilled_token_num, origin, owner, workload, run.fed)
            if finding is not None:
                findings.add(finding)
            if owner is not None and prefilled_token_num == owner.need_prefill_tokens:
                waits.append(Wait(FINISH, owner.request_id))  # the send thread finished the request
    for drop in released.drops:
        origin = _match_origin(run, drop.slot, drop.prefilled_token_num)
        finding = drop_finding(drop.slot, drop.prefilled_token_num, origin, drop.reason, workload)
        if finding is not None:
            findings.add(finding)
    run.batches = run.batches + tuple(released.batches)
    run.drops = run.drops + tuple((drop.slot, drop.prefilled_token_num) for drop in released.drops)
    run.waits = tuple(waits)
    run.findings = frozenset(findings)


def explore_rank(workload: Workload, mode: str, slot_model: str = FIFO) -> RankExploration:
    """All outcomes of one rank over every merge of the two streams."""
    exploration = explore(RaceRank(workload, mode, slot_model))
    assert exploration.interleavings == workload.merges(), (exploration.interleavings, workload.merges())
    return exploration
