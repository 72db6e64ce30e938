"""The release policy's decisions beside its batches and drops (:mod:`fastdeploy_pd_fix.policy.decision`): each kind
as the policy reports it for a tiny event sequence, its log line, and that line read back by the one parser."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.release_events import abort, orphan, reg, run_outcome, sig

from fastdeploy_pd_fix.policy.decision import (
    ABANDONED,
    ABORT_BEFORE_BOUND,
    ABORT_ON_OTHER_SLOT,
    CLOSED_AT_ABORT,
    CLOSED_REQUEST,
    COUNTED_BEFORE,
    DEAD_REQUEST,
    DECISION_KINDS,
    ORPHAN_COUNTED_BEFORE,
    ORPHAN_REQUEST,
    REGISTERED_REQUEST,
    Decision,
    parse_decision,
)
from fastdeploy_pd_fix.policy.release import OrderedRelease

#: Per case: the events, the one decision the policy reports for them, and its log line as the policy wrote it before
#: decisions were typed (operators' log lines stay byte for byte as they were).
CASES = {
    "counted before, still open": (
        [reg(0, "A", 4), reg(0, "A", 4)],
        Decision(COUNTED_BEFORE, "A", 0, occupant=REGISTERED_REQUEST),
        "registration for slot 0 ignored: request A was counted before and is still open (a repeated or late "
        "cache-info part)",
    ),
    "counted before, already closed": (
        [reg(0, "A", 4), sig((0, 0, 4)), reg(0, "A", 4)],
        Decision(COUNTED_BEFORE, "A", 0, occupant=CLOSED_REQUEST),
        "registration for slot 0 ignored: request A was counted before and is already closed (a repeated or late "
        "cache-info part)",
    ),
    "counted before, an orphan": (
        [orphan(1, "A", 4), reg(1, "A", 4)],
        Decision(COUNTED_BEFORE, "A", 1, occupant=ORPHAN_REQUEST),
        "registration for slot 1 ignored: request A was counted before and is announced as an orphan (a repeated or "
        "late cache-info part)",
    ),
    "counted before, dead": (
        [abort(0, "A", 2), reg(0, "A", 4)],
        Decision(COUNTED_BEFORE, "A", 0, occupant=DEAD_REQUEST),
        "registration for slot 0 ignored: request A was counted before and is announced as aborted before "
        "registering (a repeated or late cache-info part)",
    ),
    "orphan notice counted before": (
        [reg(0, "A", 4), orphan(0, "A", 4)],
        Decision(ORPHAN_COUNTED_BEFORE, "A"),
        "orphan notice for request A ignored: it was counted before",
    ),
    "abandoned": (
        [reg(2, "A", 8), sig((2, 0, 4)), sig((2, 0, 4))],
        Decision(ABANDONED, "A", 2, (0, 4), last_end=4, run_end=8, occupant=REGISTERED_REQUEST),
        "request A on slot 2 abandoned after 4 of 8 tokens: chunk [0, 4) does not continue it (aborted, its slot "
        "reused)",
    ),
    "orphan abandoned": (
        [orphan(0, "O", 8), sig((0, 0, 4)), sig((0, 2, 6))],
        Decision(ABANDONED, "O", 0, (2, 6), last_end=4, run_end=8, occupant=ORPHAN_REQUEST),
        "orphan O on slot 0 abandoned after 4 of 8 tokens: chunk [2, 6) does not continue it (aborted, its slot "
        "reused)",
    ),
    "closed at its abort": (
        [reg(0, "A", 8), sig((0, 0, 2)), abort(0, "A", 4), sig((0, 0, 4))],
        Decision(CLOSED_AT_ABORT, "A", 0, (0, 4), last_end=2, run_end=4, occupant=REGISTERED_REQUEST),
        "request A on slot 0 closed at 2 of emitted_end=4: chunk [0, 4) is a later request's",
    ),
    "dead, closed at its abort": (
        [abort(0, "A", 4), sig((0, 0, 8))],
        Decision(CLOSED_AT_ABORT, "A", 0, (0, 8), last_end=None, run_end=4, occupant=DEAD_REQUEST),
        "request A aborted before registering on slot 0 closed at None of emitted_end=4: chunk [0, 8) is a later "
        "request's",
    ),
    "abort on another slot": (
        [reg(0, "A", 8), abort(1, "A", None)],
        Decision(ABORT_ON_OTHER_SLOT, "A", 0, named_slot=1),
        "abort notice for request A names slot 1; it occupies slot 0",
    ),
    "abort before the bound tokens": (
        [reg(0, "A", 8), sig((0, 0, 4)), abort(0, "A", 2)],
        Decision(ABORT_BEFORE_BOUND, "A", last_end=4, run_end=2),
        "abort notice for request A: emitted_end=2 is before the 4 tokens already bound to it",
    ),
    "abort of nothing emitted after bound tokens": (
        [reg(0, "A", 8), sig((0, 0, 4)), abort(0, "A", None)],
        Decision(ABORT_BEFORE_BOUND, "A", last_end=4, run_end=None),
        "abort notice for request A: emitted_end=None is before the 4 tokens already bound to it",
    ),
}


def test_every_kind_has_a_case():
    assert {expected.kind for _, expected, _ in CASES.values()} == set(DECISION_KINDS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_policy_reports_exactly_that_decision(name):
    events, expected, _ = CASES[name]
    assert run_outcome(OrderedRelease(), events)["decisions"] == [expected]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_decision_renders_its_line_and_the_parser_reads_it_back(name):
    _, expected, line = CASES[name]
    assert expected.describe() == line
    assert parse_decision(line) == expected
    assert parse_decision(line).describe() == line


request_ids = st.text(min_size=1, max_size=40)
counts = st.integers(0, 10**6)
optional_counts = st.none() | counts
decisions = st.one_of(
    st.builds(
        Decision,
        st.just(COUNTED_BEFORE),
        request_ids,
        counts,
        occupant=st.sampled_from([REGISTERED_REQUEST, CLOSED_REQUEST, ORPHAN_REQUEST, DEAD_REQUEST]),
    ),
    st.builds(Decision, st.just(ORPHAN_COUNTED_BEFORE), request_ids),
    st.builds(
        Decision,
        st.sampled_from([ABANDONED, CLOSED_AT_ABORT]),
        request_ids,
        counts,
        st.tuples(counts, counts),
        optional_counts,
        optional_counts,
        occupant=st.sampled_from([REGISTERED_REQUEST, ORPHAN_REQUEST, DEAD_REQUEST]),
    ),
    st.builds(Decision, st.just(ABORT_ON_OTHER_SLOT), request_ids, counts, named_slot=counts),
    st.builds(Decision, st.just(ABORT_BEFORE_BOUND), request_ids, last_end=counts, run_end=optional_counts),
)


@given(decisions)
def test_any_rendered_line_reads_back_to_itself(decision):
    """Whatever a request id holds (spaces, the lines' own words, newlines), the line read back renders the same."""
    line = decision.describe()
    parsed = parse_decision(line)
    assert parsed is not None and parsed.kind == decision.kind and parsed.describe() == line


@pytest.mark.parametrize(
    "line",
    [
        "",
        "queued batch #1 [(0, 4)] seq_hash=0123abcd",
        "dropped layer-0 task slot=0 prefilled_token_num=4 from kv signal: chunk [0, 4) belongs to orphan O",
        "registration for slot 0 ignored, malformed task: KeyError('request_id')",
        "request A on slot 0 abandoned after 4 of 8 tokens",
    ],
)
def test_other_lines_are_no_decision(line):
    assert parse_decision(line) is None


@pytest.mark.parametrize(
    "kind, occupant",
    [
        ("no such kind", ""),
        (ABANDONED, ""),
        (ABANDONED, CLOSED_REQUEST),
        (COUNTED_BEFORE, ""),
        (ABORT_BEFORE_BOUND, DEAD_REQUEST),
    ],
)
def test_a_decision_names_a_known_kind_and_the_occupant_its_line_needs(kind, occupant):
    with pytest.raises(ValueError):
        Decision(kind, "A", 0, occupant=occupant)
