"""One rank's two streams as events for :class:`~fastdeploy_pd_fix.policy.release.OrderedRelease`, and what it
released and decided fed with them, and the decisions a log shows (shared by the release, decision and plugin
tests)."""

from typing import List

from fastdeploy_pd_fix.policy.decision import Decision
from fastdeploy_pd_fix.policy.notice import abort_notice, orphan_notice
from fastdeploy_pd_fix.policy.release import Registration
from fastdeploy_pd_fix.tools.diagnose_logs import release_decision


def reg(slot, request_id, need):
    """A registration carrying its task dict, as the messager step makes it."""
    task = {"request_id": request_id, "need_prefill_tokens": need, "current_id": slot}
    return ("reg", Registration(slot, request_id, need, task))


def abort(slot, request_id, emitted_end):
    return ("notice", abort_notice(slot, request_id, emitted_end))


def orphan(slot, request_id, need):
    return ("notice", orphan_notice(slot, request_id, need))


def sig(*tasks):
    return ("sig", list(tasks))


def run_outcome(policy, events):
    """Feed ("sig", tasks) / ("reg", Registration) / ("notice", Notice) events; everything released: batches, the
    request ids each is bound to, drops and decisions."""
    outcome = {"batches": [], "bound": [], "drops": [], "decisions": []}
    registered = {}
    for kind, payload in events:
        if kind == "reg":
            registered[payload.slot] = payload.need_prefill_tokens
            released = policy.add_registration(payload, registered)
        elif kind == "notice":
            released = policy.add_notice(payload, registered)
        else:
            released = policy.add_signal(payload, registered)
        outcome["batches"] += released.batches
        outcome["bound"] += [tuple(item.request_id for item in binding) for binding in released.bindings]
        outcome["drops"] += released.drops
        outcome["decisions"] += released.decisions
    return outcome


def logged_decisions(lines) -> List[Decision]:
    """The policy's decisions among log ``lines``, read back as ``diagnose`` reads them."""
    decisions = (release_decision(line) for line in lines)
    return [decision for decision in decisions if decision is not None]
