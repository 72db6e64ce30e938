"""One rank: every merge of the two streams, driven through a fresh policy and reduced to its distinct outcomes.

The merges of one rank are independent of the other ranks, and ranks interact only through the sequences they
release. So the explorer computes, once per workload, the set of distinct outcomes one rank can reach (a forward
search that merges equal ``(release state, outputs)`` after each number of delivered events), weighted by how many
merges lead to each; cross-rank checks then compare outcomes (:mod:`.checks`), which covers all ``merges ** nranks``
joint interleavings without enumerating them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from fastdeploy_pd_fix.engine_history.streams import Workload
from fastdeploy_pd_fix.policy.release import Batch, Released, ReleasePolicy, Task, policy_after_first_read
from fastdeploy_pd_fix.verify.barriers import BEGIN, FINISH, Wait
from fastdeploy_pd_fix.verify.checks import CRASH, Outcome, drop_finding, end_findings, release_finding
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
    simpler_merge,
    switches,
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
    schedule: str = ""
    slot_model: str = FIFO

    @classmethod
    def start(cls, mode: str, slot_model: str = FIFO) -> "RankRun":
        return cls(make_policy(mode), {}, {}, frozenset(), slot_model=slot_model)

    def key(self) -> tuple:
        return (
            self.signals_fed,
            policy_snapshot(self.policy),
            tuple(self.slot_registrations.items()),
            tuple(self.unmatched.items()),
            self.batches,
            self.drops,
            self.waits,
            self.findings,
        )

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
            self.schedule,
            self.slot_model,
        )


def advance(run: RankRun, event: str, workload: Workload) -> Tuple[RankRun, Released]:
    """Deliver the next event of one stream to a copy of ``run``; return the copy and what the policy released."""
    child = run.branch()
    child.schedule += event
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
        released = deliver(child.policy, workload, event, index, child.slot_registrations, child.slot_model)
    except Exception as error:  # a crash on valid input is itself a finding
        child.findings = child.findings | {(CRASH, f"{type(error).__name__}: {error}")}
        return child, Released()
    _record(child, released, workload)
    return child, released


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


@dataclass
class RankExploration:
    outcomes: List[Outcome]
    merges: int
    states: int


def explore_rank(workload: Workload, mode: str, slot_model: str = FIFO) -> RankExploration:
    """All outcomes of one rank over every merge of the two streams (forward search, merging equal states)."""
    total_events = len(workload.signals) + len(workload.registrations)
    frontier: Dict[tuple, Tuple[RankRun, int]] = {}
    start = RankRun.start(mode, slot_model)
    frontier[start.key()] = (start, 1)
    states = 1
    for _ in range(total_events):
        successors: Dict[tuple, Tuple[RankRun, int]] = {}
        for run, count in frontier.values():
            events = []
            if run.signals_fed < len(workload.signals):
                events.append(SIGNAL_EVENT)
            if run.registrations_fed < len(workload.registrations):
                events.append(REGISTRATION_EVENT)
            for event in events:
                child, _ = advance(run, event, workload)
                key = child.key()
                if key in successors:
                    known, known_count = successors[key]
                    known.schedule = simpler_merge(known.schedule, child.schedule)
                    successors[key] = (known, known_count + count)
                else:
                    successors[key] = (child, count)
        states += len(successors)
        frontier = successors

    outcomes: Dict[tuple, Outcome] = {}
    for run, count in frontier.values():
        findings = end_findings(run.findings, run.policy.waiting_signals(), run.unmatched, workload)
        key = (run.batches, run.drops, run.waits, findings)
        if key in outcomes:
            outcome = outcomes[key]
            outcome.weight += count
            outcome.witness = simpler_merge(outcome.witness, run.schedule)
        else:
            outcomes[key] = Outcome(run.batches, run.drops, run.waits, findings, count, run.schedule)
    merged = sum(outcome.weight for outcome in outcomes.values())
    assert merged == workload.merges(), (merged, workload.merges())
    ordered = sorted(outcomes.values(), key=lambda o: (switches(o.witness), o.witness))
    return RankExploration(ordered, merged, states)


def replay(workload: Workload, mode: str, schedule: str, slot_model: str = FIFO) -> List[dict]:
    """Re-run one merge and describe, event by event, what the rank released."""
    run = RankRun.start(mode, slot_model)
    steps = []
    for position, event in enumerate(schedule):
        if event == SIGNAL_EVENT:
            index = run.signals_fed
            what = {"event": "signal", "index": index, "tasks": [list(t) for t in workload.signals[index]]}
        else:
            index = run.registrations_fed
            registration = workload.registrations[index]
            what = {
                "event": "registration",
                "index": index,
                "request_id": registration.request_id,
                "slot": registration.slot,
                "need_prefill_tokens": registration.need_prefill_tokens,
            }
        run, released = advance(run, event, workload)
        what["step"] = position
        what["released"] = [[list(task) for task in batch] for batch in released.batches]
        what["dropped"] = [[drop.slot, drop.prefilled_token_num, drop.reason] for drop in released.drops]
        steps.append(what)
    return steps
