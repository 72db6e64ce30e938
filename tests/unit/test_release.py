"""Unit tests that drive the release core directly, event by event, as one rank's two threads would."""

import pytest

from fastdeploy_pd_fix.core.release import OrderedRelease, Registration, UpstreamRelease, make_release

A0 = Registration(0, "A", 8)  # slot 0, two chunks of 4
B1 = Registration(1, "B", 4)  # slot 1, one chunk


def run(policy, events):
    """Feed ("sig", tasks) / ("reg", Registration) events; return all batches and drops in release order."""
    batches, drops = [], []
    registered = {}
    for kind, payload in events:
        if kind == "reg":
            registered[payload.slot] = payload.need_prefill_tokens
            released = policy.add_registration(payload, registered)
        else:
            released = policy.add_signal(payload, registered)
        batches += released.batches
        drops += released.drops
    return batches, drops


SIG_S1 = ("sig", [(0, 4), (1, 4)])
REG_A_S1 = ("reg", Registration(0, "A", 4))
REG_B_S1 = ("reg", B1)


@pytest.mark.parametrize(
    "name, rank0, rank1",
    [
        ("s1 seed", [REG_A_S1, REG_B_S1, SIG_S1], [REG_A_S1, SIG_S1, REG_B_S1]),
        (
            "s2 chunked early",
            [("reg", A0), ("sig", [(0, 4)]), ("sig", [(0, 8)])],
            [("sig", [(0, 4)]), ("sig", [(0, 8)]), ("reg", A0)],
        ),
        (
            "s3 cross-request order",
            [("reg", B1), ("sig", [(0, 4), (1, 4)]), ("reg", A0), ("sig", [(0, 8)])],
            [("reg", B1), ("reg", A0), ("sig", [(0, 4), (1, 4)]), ("sig", [(0, 8)])],
        ),
    ],
)
def test_ordered_releases_the_same_sequence_on_both_ranks(name, rank0, rank1):
    batches0, drops0 = run(OrderedRelease(), rank0)
    batches1, drops1 = run(OrderedRelease(), rank1)
    assert batches0 == batches1, name
    assert drops0 == drops1 == []
    signals = [tuple(payload) for kind, payload in rank0 if kind == "sig"]
    assert batches0 == signals  # one batch per kv signal, the engine's own granularity


@pytest.mark.parametrize(
    "rank0, rank1",
    [
        # s2: latest-per-slot pending collapses two chunk batches into one on the rank whose signals came early.
        ([("reg", A0), ("sig", [(0, 4)]), ("sig", [(0, 8)])], [("sig", [(0, 4)]), ("sig", [(0, 8)]), ("reg", A0)]),
        # s3: recovery order differs between the ranks.
        (
            [("reg", B1), ("sig", [(0, 4), (1, 4)]), ("reg", A0), ("sig", [(0, 8)])],
            [("reg", B1), ("reg", A0), ("sig", [(0, 4), (1, 4)]), ("sig", [(0, 8)])],
        ),
    ],
)
def test_upstream_mode_diverges_on_s2_and_s3_as_documented(rank0, rank1):
    assert run(UpstreamRelease(), rank0)[0] != run(UpstreamRelease(), rank1)[0]


def test_upstream_mode_fixes_the_seed_case():
    assert run(UpstreamRelease(), [REG_A_S1, REG_B_S1, SIG_S1])[0] == [((0, 4),), ((1, 4),)]
    assert run(UpstreamRelease(), [REG_A_S1, SIG_S1, REG_B_S1])[0] == [((0, 4),), ((1, 4),)]


def test_nothing_is_released_before_registration_and_later_signals_wait_behind():
    policy = OrderedRelease()
    assert policy.add_signal([(0, 4)]).batches == []
    assert policy.add_signal([(1, 4)]).batches == []
    assert policy.add_registration(B1).batches == []  # B is registered, but the older signal for A is not
    assert policy.waiting_signals() == [((0, 4),), ((1, 4),)]
    assert policy.add_registration(Registration(0, "A", 4)).batches == [((0, 4),), ((1, 4),)]
    assert policy.waiting_signals() == []


def test_slot_reuse_binds_each_signal_to_its_own_registration():
    policy = OrderedRelease()
    first, second = Registration(3, "first", 4), Registration(3, "second", 6)
    events = [("sig", [(3, 4)]), ("sig", [(3, 6)]), ("reg", first), ("reg", second)]
    batches, drops = run(policy, events)
    assert batches == [((3, 4),), ((3, 6),)] and drops == []
    assert policy.open_registrations() == {}


def test_never_registering_task_is_judged_against_its_slots_next_registration():
    # "lost" ran in slot 5 (10 tokens) and never registered; slot 5 then went to "next" (4 tokens).
    events = [
        ("sig", [(5, 10)]),
        ("sig", [(2, 3)]),
        ("sig", [(5, 4)]),
        ("reg", Registration(2, "other", 3)),
        ("reg", Registration(5, "next", 4)),
    ]
    batches, drops = run(OrderedRelease(), events)
    assert [(d.slot, d.prefilled_token_num) for d in drops] == [(5, 10)]
    assert "exceeds need_prefill_tokens 4 of request next" in drops[0].reason
    assert batches == [((2, 3),), ((5, 4),)]


def test_duplicate_or_shrinking_token_number_is_dropped_and_logged_once():
    events = [("reg", A0), ("sig", [(0, 4)]), ("sig", [(0, 4)]), ("sig", [(0, 2)]), ("sig", [(0, 8)])]
    batches, drops = run(OrderedRelease(), events)
    assert batches == [((0, 4),), ((0, 8),)]
    assert [(d.prefilled_token_num, "does not advance" in d.reason) for d in drops] == [(4, True), (2, True)]


def test_signal_keeps_its_valid_tasks_when_one_is_dropped():
    events = [("reg", Registration(0, "A", 4)), ("reg", B1), ("sig", [(0, 9), (1, 4)])]
    batches, drops = run(OrderedRelease(), events)
    assert batches == [((1, 4),)] and [d.slot for d in drops] == [0]


def test_repeated_registration_of_the_latest_request_is_ignored():
    policy = OrderedRelease()
    assert policy.add_registration(Registration(0, "A", 4)).ignored == []
    repeated = policy.add_registration(Registration(0, "A", 4))
    assert len(repeated.ignored) == 1 and "repeated cache-info part" in repeated.ignored[0]
    policy.add_registration(Registration(0, "B", 8))
    batches, drops = run(policy, [("sig", [(0, 4)]), ("sig", [(0, 6)]), ("sig", [(0, 8)])])
    assert batches == [((0, 4),), ((0, 6),), ((0, 8),)] and drops == []  # B is judged against B, not a stale A


def test_waiting_signals_show_the_whole_head_signal():
    policy = OrderedRelease()
    policy.add_registration(Registration(0, "A", 4))
    policy.add_signal([(0, 4), (1, 4)])  # A is bound, B waits: the head signal still holds both
    assert policy.waiting_signals() == [((0, 4), (1, 4))]


@pytest.mark.parametrize("tasks", [[(-1, 4)], [(0, -4)], [(0, "4")], [(True, 4)], [5], [(0, 1, 2)]])
def test_malformed_tasks_raise_and_leave_state_untouched(tasks):
    policy = OrderedRelease()
    with pytest.raises(ValueError):
        policy.add_signal(tasks)
    assert policy.waiting_signals() == []
    assert policy.add_signal([(0, 4)]).batches == []


@pytest.mark.parametrize("slot, need", [(-1, 4), (0, 0), (0, -3), (0, None)])
def test_malformed_registration_is_rejected(slot, need):
    with pytest.raises(ValueError):
        Registration(slot, "X", need)


def test_make_release_rejects_unknown_mode():
    assert make_release("ordered").mode == "ordered" and make_release("upstream").mode == "upstream"
    with pytest.raises(ValueError, match="unknown release mode"):
        make_release("fast")
