"""The send threads' barrier waits, simulated on ``threading.Barrier(nranks)`` semantics.

Every released batch costs one ``begin_send_cache_barrier`` wait, every request it completes one
``finish_send_cache_barrier`` wait followed by ``put_finished_req(request_id)``. Ranks that wait in different orders
block each other forever: there is no timeout.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple

BEGIN = "begin_send_cache_barrier"
FINISH = "finish_send_cache_barrier"


class Wait(NamedTuple):
    """One barrier wait of the send thread; a finish wait is followed by ``put_finished_req(request_id)``."""

    barrier: str
    request_id: Optional[str] = None

    def describe(self) -> str:
        return "begin" if self.barrier == BEGIN else f"finish({self.request_id})"


@dataclass
class BarrierRun:
    """Result of simulating the send threads of all ranks on ``threading.Barrier(nranks)`` objects."""

    deadlocked: bool
    rounds: List[Tuple[str, Tuple[Optional[str], ...]]] = field(default_factory=list)  # tripped barrier, ids
    blocked: List[dict] = field(default_factory=list)  # per rank, where it blocks forever
    mismatched_round: Optional[int] = None  # first finish round whose request ids differ across ranks

    def to_json(self) -> dict:
        return {
            "deadlocked": self.deadlocked,
            "rounds": [{"barrier": barrier, "request_ids": list(ids)} for barrier, ids in self.rounds],
            "blocked": self.blocked,
            "mismatched_round": self.mismatched_round,
        }


def simulate_barriers(wait_sequences: Sequence[Sequence[Wait]]) -> BarrierRun:
    """Run every rank's waits against shared ``Barrier(nranks)`` objects, the way the manager's barriers behave.

    A barrier trips when all ``nranks`` parties wait on it; a rank waits on one barrier at a time, in order. When no
    barrier can trip while some rank still waits, the waiting ranks block forever (there is no timeout). After each
    finish round the engine's ``get_finished_req`` takes one request id per rank and reports rank 0's.
    """
    nranks = len(wait_sequences)
    positions = [0] * nranks
    result = BarrierRun(deadlocked=False)
    while True:
        waiting = {
            rank: wait_sequences[rank][positions[rank]]
            for rank in range(nranks)
            if positions[rank] < len(wait_sequences[rank])
        }
        if not waiting:
            return result
        parties = Counter(wait.barrier for wait in waiting.values())
        tripped = [barrier for barrier, count in parties.items() if count == nranks]
        if not tripped:
            result.deadlocked = True
            for rank in range(nranks):
                wait = waiting.get(rank)
                result.blocked.append(
                    {
                        "rank": rank,
                        "wait_index": positions[rank],
                        "barrier": wait.barrier if wait else None,
                        "parties_waiting": parties[wait.barrier] if wait else None,
                        "parties_needed": nranks,
                        "note": "waits forever" if wait else "has no more waits; the others wait for it forever",
                    }
                )
            return result
        barrier = tripped[0]
        request_ids = tuple(waiting[rank].request_id for rank in range(nranks))
        if barrier == FINISH and len(set(request_ids)) > 1 and result.mismatched_round is None:
            result.mismatched_round = len(result.rounds)
        result.rounds.append((barrier, request_ids if barrier == FINISH else ()))
        for rank in range(nranks):
            positions[rank] += 1


def describe_barriers(barrier_run: BarrierRun) -> List[str]:
    lines = []
    for number, (barrier, ids) in enumerate(barrier_run.rounds):
        short = "begin" if barrier == BEGIN else "finish"
        detail = f" request ids per rank {list(ids)}" if ids else ""
        flag = "  <-- get_finished_req reports rank 0's id" if number == barrier_run.mismatched_round else ""
        lines.append(f"round {number}: {short} barrier tripped{detail}{flag}")
    for blocked in barrier_run.blocked:
        if blocked["barrier"] is None:
            lines.append(f"rank {blocked['rank']}: {blocked['note']}")
        else:
            short = "begin" if blocked["barrier"] == BEGIN else "finish"
            lines.append(
                f"rank {blocked['rank']}: blocks at wait #{blocked['wait_index']} on the {short} barrier "
                f"({blocked['parties_waiting']}/{blocked['parties_needed']} parties)"
            )
    if barrier_run.deadlocked:
        lines.append("=> DEADLOCK")
    return lines
