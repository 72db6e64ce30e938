"""The slot-lifecycle families' rank model for the explorer (:mod:`.explorer`): signal, registration and send threads.

The race families' model (:mod:`.race_rank`) has the send thread send a batch the moment it is released. Here the
send thread is an actor of its own, with two steps: *take* (take the oldest queued batch, wait on
``begin_send_cache_barrier`` and read, for each task, the registration to send with) and *finish* (for each task
that completes its request: wait on ``finish_send_cache_barrier``, report the request finished, and clean its
``cache_info`` entry and its ``idx_cache_task_dict`` entry up). Registrations can land between the two, which is
where an aborted request's batch meets its slot's next request.

What the send thread reads:

* ``ordered``: the registration the batch is bound to (``Released.bindings``; in the plugin ``BoundTaskDict``
  shows it to the send thread), and the cleanup deletes the slot's entry only if it still is that registration;
* ``upstream`` and ``pr7872``: ``idx_cache_task_dict[slot]`` at send time, a plain dict that holds every completed
  registration (stale repeats included) and loses the slot's entry at every cleanup.

The explorer takes every interleaving of the three actors that the engine gates allow (:mod:`.lifecycle`); each
distinct end is an :class:`~.checks.Outcome`, weighted by the interleavings reaching it, so that the cross-rank
checks of :mod:`.checks` apply unchanged. Per-rank findings (ground truth from the workload):

* ``send-binding`` / ``send-early`` (invariant 6): a task is sent with another request's registration; *early*
  when that request had not computed the chunk yet (its blocks go out before they exist);
* ``send-missing``: the slot has no registration at send time;
* ``liveness`` (invariant 5): a request that registers and completes in the engine is never sent completely with
  its own registration, or never finished; ``hang``: the engine can never free a slot, so the slot's later requests
  never appear; ``stuck``: a signal is held at the head of the log for ever (it blocks every later signal);
* ``dropped-live``: a task of such a request was dropped; ``phantom``: a released or dropped task no signal gave.

A workload with notices (:func:`fastdeploy_pd_fix.engine_history.streams.with_notices`) hands each ``ABORT`` and
``ORPHAN`` to the policy's ``add_notice`` as the registration thread reaches it. The fence (release rule 9) is the
engine gate that the slot's next occupancy's signals (and its admission record) exist on this rank only after its
registration thread has handed every earlier occupancy's ``ABORT`` to the policy; ``fence=False`` drops that gate, to
show that it is needed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fastdeploy_pd_fix.engine_history.occupancy import ABORT_NOTICE, DECODE_PART, ORPHAN_NOTICE, PREFILL_PART
from fastdeploy_pd_fix.engine_history.streams import LifecycleWorkload, task_text
from fastdeploy_pd_fix.policy.notice import abort_notice, orphan_notice
from fastdeploy_pd_fix.policy.release import OrderedRelease, Registration, Released, policy_after_first_read
from fastdeploy_pd_fix.verify.barriers import BEGIN, FINISH, Wait
from fastdeploy_pd_fix.verify.checks import (
    CRASH,
    DROPPED_LIVE,
    HANG,
    LIVENESS,
    PHANTOM,
    SEND_BINDING,
    SEND_EARLY,
    SEND_MISSING,
    STUCK,
)
from fastdeploy_pd_fix.verify.explorer import OutcomeKey, RankExploration, explore
from fastdeploy_pd_fix.verify.models import clone_policy, make_policy, policy_snapshot
from fastdeploy_pd_fix.verify.workloads import batch_bindings

SIGNAL, CACHE_INFO, TAKE, FINISH_SEND = "S", "C", "X", "Y"
ACTORS = {SIGNAL: "signal thread", CACHE_INFO: "registration thread", TAKE: "send: take", FINISH_SEND: "send: finish"}

#: A registration as the send thread reads it: (request id, need_prefill_tokens).
Read = Optional[Tuple[str, int]]


class LifecycleState:
    """One rank's state: the policy, stream positions, the queue and the send thread, the modelled dicts, outputs."""

    __slots__ = (
        "policy",
        "signals_fed",
        "cache_fed",
        "queue",
        "holding",
        "task_dict",
        "cache_info",
        "finished",
        "unmatched",
        "batches",
        "drops",
        "waits",
        "sent",
        "findings",
    )

    def branch(self) -> "LifecycleState":
        twin = LifecycleState()
        twin.policy = clone_policy(self.policy)
        twin.signals_fed, twin.cache_fed, twin.queue, twin.holding = (
            self.signals_fed,
            self.cache_fed,
            self.queue,
            self.holding,
        )
        twin.task_dict, twin.cache_info, twin.finished = dict(self.task_dict), set(self.cache_info), set(self.finished)
        twin.unmatched, twin.sent = dict(self.unmatched), dict(self.sent)
        twin.batches, twin.drops, twin.waits, twin.findings = self.batches, self.drops, self.waits, self.findings
        return twin


class LifecycleRank:
    """One rank of a lifecycle workload: the :class:`~.explorer.RankModel` of its three actors, for one release mode
    (with the fence gate on a workload with notices, unless ``fence`` is False)."""

    def __init__(self, workload: LifecycleWorkload, mode: str, fence: bool = True):
        self.workload = workload
        self.mode = mode
        self.occupancies = workload.occupancies
        self.earlier = [
            [j for j in range(i) if self.occupancies[j].slot == occupancy.slot]
            for i, occupancy in enumerate(self.occupancies)
        ]
        aborts = {index: position for position, (kind, index) in enumerate(workload.cache) if kind == ABORT_NOTICE}
        # Per occupancy: how many cache-info events the registration thread must have handed over before it is
        # admitted on this rank (rule 9: every earlier occupancy's ABORT on its slot; 0: no fence).
        self.fence = [
            max([aborts[j] + 1 for j in self.earlier[i] if j in aborts] or [0]) if fence else 0
            for i in range(len(self.occupancies))
        ]

    def start(self) -> LifecycleState:
        rank = LifecycleState()
        rank.policy = make_policy(self.mode)
        rank.signals_fed = rank.cache_fed = 0
        rank.queue, rank.holding = (), None
        rank.task_dict, rank.cache_info, rank.finished, rank.unmatched, rank.sent = {}, set(), set(), {}, {}
        rank.batches, rank.drops, rank.waits, rank.findings = (), (), (), frozenset()
        return rank

    def key(self, rank: LifecycleState) -> tuple:
        return (
            policy_snapshot(rank.policy),
            rank.signals_fed,
            rank.cache_fed,
            rank.queue,
            rank.holding,
            tuple(sorted(rank.task_dict.items())),
            tuple(sorted(rank.cache_info)),
            tuple(sorted(rank.finished)),
            tuple(sorted(rank.unmatched.items())),
            rank.batches,
            rank.drops,
            rank.waits,
            tuple(sorted(rank.sent.items())),
            rank.findings,
        )

    # -- engine gates and enabled actors ------------------------------------------------------------------------
    def _admitted(self, rank: LifecycleState, occupancy: int) -> bool:
        """The engine has freed the slot for ``occupancy``: every earlier transferring request on it finished (and,
        with the fence, this rank handled every earlier ABORT on it)."""
        return rank.cache_fed >= self.fence[occupancy] and all(
            self.occupancies[j].request_id in rank.finished
            for j in self.earlier[occupancy]
            if self.occupancies[j].transfers
        )

    def enabled(self, rank: LifecycleState) -> List[str]:
        actors = []
        workload = self.workload
        if rank.signals_fed < len(workload.signals):
            if all(self._admitted(rank, owner) for owner in workload.signal_gates(rank.signals_fed)):
                actors.append(SIGNAL)
        if rank.cache_fed < len(workload.cache) and self._admitted(rank, workload.cache_gate[rank.cache_fed]):
            actors.append(CACHE_INFO)
        if rank.holding is not None:
            actors.append(FINISH_SEND)
        elif rank.queue:
            actors.append(TAKE)
        return actors

    # -- the actors ---------------------------------------------------------------------------------------------
    def step(self, rank: LifecycleState, actor: str) -> LifecycleState:
        rank = rank.branch()
        try:
            if actor == SIGNAL:
                self._signal(rank)
            elif actor == CACHE_INFO:
                self._cache_info(rank)
            elif actor == TAKE:
                self._take(rank)
            else:
                self._finish(rank)
        except Exception as error:  # a crash on valid input is itself a finding
            rank.findings = rank.findings | {(CRASH, f"{type(error).__name__}: {error}")}
        return rank

    def _registered(self, rank: LifecycleState) -> Dict[int, int]:
        return {slot: need for slot, (_, need) in rank.task_dict.items()}

    def _signal(self, rank: LifecycleState) -> None:
        index = rank.signals_fed
        rank.signals_fed += 1
        tasks = self.workload.signals[index]
        for (slot, _, end), tid in zip(tasks, self.workload.signal_tids[index]):
            rank.unmatched[slot] = rank.unmatched.get(slot, ()) + ((end, tid),)
        self._publish(rank, rank.policy.add_signal(tasks, self._registered(rank)))

    def _cache_info(self, rank: LifecycleState) -> None:
        kind, index = self.workload.cache[rank.cache_fed]
        if rank.cache_fed == 0:
            rank.policy, handed_over = policy_after_first_read(
                rank.policy, self.workload.announced, self._registered(rank)
            )
            self._publish(rank, handed_over)
        rank.cache_fed += 1
        occupancy = self.occupancies[index]
        if kind == PREFILL_PART:
            rank.cache_info.add(occupancy.request_id)
        elif kind == DECODE_PART and occupancy.request_id in rank.cache_info:
            # the messager stores every completed task, whatever the policy makes of it, then the policy sees it
            rank.task_dict[occupancy.slot] = (occupancy.request_id, occupancy.need)
            registration = Registration(occupancy.slot, occupancy.request_id, occupancy.need, occupancy.request_id)
            self._publish(rank, rank.policy.add_registration(registration, self._registered(rank)))
        elif kind == ABORT_NOTICE:
            notice = abort_notice(occupancy.slot, occupancy.request_id, occupancy.emitted_end)
            self._publish(rank, rank.policy.add_notice(notice, self._registered(rank)))
        elif kind == ORPHAN_NOTICE:
            notice = orphan_notice(occupancy.slot, occupancy.request_id, occupancy.need)
            self._publish(rank, rank.policy.add_notice(notice, self._registered(rank)))

    def _match(self, rank: LifecycleState, slot: int, end: int, signal: Optional[int] = None) -> Optional[int]:
        """Which delivered task a released or dropped ``(slot, end)`` is: the task of layer-0 signal ``signal`` on
        ``slot`` when the policy says which signal a batch is (``Released.signal_numbers``); else, as the ordered
        policy decides strictly in signal order, the earliest unmatched one (a latest-per-slot pending buffer
        keeps the latest). None: no such task was delivered and not yet matched."""
        entries = rank.unmatched.get(slot, ())
        if signal is not None:
            signalled = zip(self.workload.signals[signal], self.workload.signal_tids[signal])
            wanted = {tid for (task_slot, _, _), tid in signalled if task_slot == slot}
            positions = [position for position, (number, tid) in enumerate(entries) if number == end and tid in wanted]
        else:
            positions = [position for position, (number, _) in enumerate(entries) if number == end]
        if not positions:
            return None
        position = positions[0] if isinstance(rank.policy, OrderedRelease) else positions[-1]
        rank.unmatched[slot] = entries[:position] + entries[position + 1 :]
        return entries[position][1]

    def _publish(self, rank: LifecycleState, released: Released) -> None:
        """Record what one call released. Batches are matched first, each to its own signal's tasks where the
        policy numbers them, so that a drop of one call is not taken for a later signal's released task with the
        same content."""
        findings = set(rank.findings)
        queued = []
        for number, batch in enumerate(released.batches):
            signal = released.signal_numbers[number] if number < len(released.signal_numbers) else None
            entries = []
            for (slot, end), bound in zip(batch, batch_bindings(released, number)):
                read = None if bound is None else (bound.request_id, bound.need_prefill_tokens)
                entries.append((slot, end, self._match(rank, slot, end, signal), read))
            queued.append(tuple(entries))
        for drop in released.drops:
            tid = self._match(rank, drop.slot, drop.prefilled_token_num)
            task = f"task ({drop.slot},{drop.prefilled_token_num})"
            if tid is None:
                findings.add((PHANTOM, f"{task} dropped but never signalled (or handled twice)"))
            elif self.occupancies[self.workload.tid_owner[tid]].transfers:
                owner = self.occupancies[self.workload.tid_owner[tid]].request_id
                findings.add((DROPPED_LIVE, f"{task} of {owner} dropped: {drop.reason}"))
        rank.queue = rank.queue + tuple(queued)
        rank.batches = rank.batches + tuple(released.batches)
        rank.drops = rank.drops + tuple((drop.slot, drop.prefilled_token_num) for drop in released.drops)
        rank.findings = frozenset(findings)

    def _computed(self, rank: LifecycleState, request_id: str, end: int) -> bool:
        """Whether ``request_id`` had computed its chunk ending at ``end`` (a signal of it delivered so far)."""
        workload = self.workload
        return any(
            self.occupancies[workload.tid_owner[tid]].request_id == request_id and task[2] >= end
            for tasks, tids in zip(workload.signals[: rank.signals_fed], workload.signal_tids)
            for task, tid in zip(tasks, tids)
        )

    def _take(self, rank: LifecycleState) -> None:
        batch, rank.queue = rank.queue[0], rank.queue[1:]
        findings = set(rank.findings)
        reads = []
        for slot, end, tid, bound in batch:
            read: Read = bound if bound is not None else rank.task_dict.get(slot)
            reads.append((slot, end, read))
            task = f"task ({slot},{end})"
            if tid is None:
                findings.add((PHANTOM, f"{task} released but never signalled (or released twice)"))
                continue
            origin = self.occupancies[self.workload.tid_owner[tid]]
            what = f"{task} of {'orphan ' if not origin.registers else ''}{origin.request_id}"
            if read is None:
                findings.add((SEND_MISSING, f"{what}: slot {slot} has no registration at send time"))
                continue
            rank.sent[tid] = read[0]
            if read[0] != origin.request_id:
                if self._computed(rank, read[0], end):
                    findings.add((SEND_BINDING, f"{what} sent with {read[0]}'s registration"))
                else:
                    findings.add((SEND_EARLY, f"{what} sent as {read[0]}'s blocks before {read[0]} computed them"))
        rank.waits = rank.waits + (Wait(BEGIN),)
        rank.holding = tuple(reads)
        rank.findings = frozenset(findings)

    def _finish(self, rank: LifecycleState) -> None:
        waits = []
        for slot, end, read in rank.holding:
            if read is None or end != read[1]:
                continue
            waits.append(Wait(FINISH, read[0]))
            rank.finished.add(read[0])
            rank.cache_info.discard(read[0])
            if not isinstance(rank.policy, OrderedRelease) or rank.task_dict.get(slot) == read:
                rank.task_dict.pop(slot, None)  # a bound batch's del leaves a newer occupant's entry in place
        rank.waits = rank.waits + tuple(waits)
        rank.holding = None

    # -- the end ------------------------------------------------------------------------------------------------
    def end_findings(self, rank: LifecycleState) -> frozenset:
        findings = set(rank.findings)
        workload = self.workload
        if rank.signals_fed < len(workload.signals) or rank.cache_fed < len(workload.cache):
            if rank.signals_fed < len(workload.signals):
                blocked = workload.signal_gates(rank.signals_fed)[0]
            else:
                blocked = workload.cache_gate[rank.cache_fed]
            request = self.occupancies[blocked].request_id
            findings.add((HANG, f"the engine never frees slot {self.occupancies[blocked].slot} for {request}"))
        for index, occupancy in enumerate(self.occupancies):
            if not occupancy.transfers:
                continue
            # the final chunk's send covers every block not sent yet, so a skipped intermediate batch is no loss
            # by itself (a dropped one is dropped-live)
            if rank.sent.get(workload.final_tid(index)) != occupancy.request_id:
                findings.add((LIVENESS, f"{occupancy.request_id}'s final chunk is never sent with its registration"))
            elif occupancy.request_id not in rank.finished:
                findings.add((LIVENESS, f"{occupancy.request_id} is never reported finished"))
        if isinstance(rank.policy, OrderedRelease) and rank.policy.has_waiting():
            findings.add((STUCK, f"signal {rank.policy.waiting_signals()[0]} is held for ever"))
        return frozenset(findings)

    def outcome(self, rank: LifecycleState) -> OutcomeKey:
        return (rank.batches, rank.drops, rank.waits, self.end_findings(rank))

    def describe(self, position: int, before: LifecycleState, actor: str, after: LifecycleState) -> str:
        """One line: the actor, what it handled, and what came out of it."""
        workload = self.workload
        if actor == SIGNAL:
            event = "signal " + ",".join(map(task_text, workload.signals[before.signals_fed]))
        elif actor == CACHE_INFO:
            kind, index = workload.cache[before.cache_fed]
            if kind in (PREFILL_PART, DECODE_PART):
                event = f"{kind}-part of {workload.occupancies[index].request_id}"
            else:
                event = "notice " + workload.event_text(before.cache_fed)
        elif actor == TAKE:
            event = "take " + ",".join(f"({slot},{end})" for slot, end, _, _ in before.queue[0])
        else:
            event = "finish " + ",".join(
                f"({slot},{end}) as {read[0] if read else '-'}" for slot, end, read in before.holding
            )
        out = [f"batch {list(batch)}" for batch in after.batches[len(before.batches) :]]
        out += [f"drop {drop}" for drop in after.drops[len(before.drops) :]]
        if actor == TAKE:
            out.append("reads " + ", ".join(read[0] if read else "nothing" for _, _, read in after.holding))
        return f"{position:>2} {ACTORS[actor]:<19} {event:<34} -> {'; '.join(out) or '-'}"


def explore_lifecycle_rank(workload: LifecycleWorkload, mode: str, fence: bool = True) -> RankExploration:
    """All outcomes of one rank over every interleaving of its three actors."""
    return explore(LifecycleRank(workload, mode, fence))
