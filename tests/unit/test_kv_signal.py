"""The kv signal parser, on real paddle CPU tensors as ``get_output_kv_signal`` fills them."""

import numpy as np
import paddle
import pytest

from fastdeploy_pd_fix.core.kv_signal import KV_SIGNAL_LENGTH, parse_kv_signal


def signal_buffer(count, layer, triples=()):
    buffer = paddle.full([KV_SIGNAL_LENGTH], -1, dtype="int32")
    values = np.full([KV_SIGNAL_LENGTH], -1, dtype=np.int32)
    values[0], values[1] = count, layer
    for index, triple in enumerate(triples):
        values[2 + 3 * index : 5 + 3 * index] = triple
    buffer.set_value(values)
    return buffer


def test_valid_signal_gives_chunks_in_engine_order():
    parsed = parse_kv_signal(signal_buffer(3, 0, [(7, 0, 16), (2, 32, 8), (511, 0, 1)]).numpy())
    assert parsed.problems == []
    assert parsed.signal.layer == 0
    assert parsed.signal.tasks == ((7, 0, 16), (2, 32, 40), (511, 0, 1))  # (slot, chunk_offset, prefilled_token_num)
    assert all(type(value) is int for task in parsed.signal.tasks for value in task)


def test_no_signal_is_not_a_problem():
    parsed = parse_kv_signal(signal_buffer(-1, -1).numpy())
    assert parsed.signal is None and parsed.problems == []


@pytest.mark.parametrize(
    "count, layer, expected", [(513, 0, "out of range"), (-7, 0, "out of range"), (1, -2, "negative")]
)
def test_signal_rejected_whole_with_reason(count, layer, expected):
    parsed = parse_kv_signal(signal_buffer(count, layer, [(0, 0, 4)]).numpy())
    assert parsed.signal is None
    assert len(parsed.problems) == 1 and expected in parsed.problems[0]


def test_bad_tasks_dropped_with_reasons_and_valid_ones_kept():
    triples = [(0, 0, 4), (512, 0, 4), (-1, 0, 4), (1, -3, 4), (2, 0, 0), (3, 4, 4)]
    parsed = parse_kv_signal(signal_buffer(len(triples), 5, triples).numpy())
    assert parsed.signal.tasks == ((0, 0, 4), (3, 4, 8))
    assert len(parsed.problems) == 4
    assert "task 1 dropped: slot 512" in parsed.problems[0]


def test_slot_range_follows_engine_cache_tasks():
    parsed = parse_kv_signal(signal_buffer(1, 0, [(20, 0, 4)]).numpy(), num_slots=16)
    assert parsed.signal.tasks == () and "slot 20" in parsed.problems[0]


def test_short_buffer_is_a_problem_not_a_crash():
    assert "entries" in parse_kv_signal(np.array([1], dtype=np.int32)).problems[0]
    parsed = parse_kv_signal(np.array([2, 0, 0, 0, 4], dtype=np.int32))
    assert parsed.signal is None and "out of range [0, 1]" in parsed.problems[0]
