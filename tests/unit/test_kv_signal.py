"""The kv signal parser, on real paddle CPU tensors as ``get_output_kv_signal`` fills them."""

import ast
import logging
import queue
import threading
from pathlib import Path

import numpy as np
import paddle
import pytest

from fastdeploy_pd_fix import analysis
from fastdeploy_pd_fix.adapters.messager_step import make_step
from fastdeploy_pd_fix.policy.kv_signal import KV_SIGNAL_LENGTH, parse_kv_signal


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


@pytest.mark.parametrize("layer, kept", [(0, True), (39, True), (40, False), (2**31 - 1, False)])
def test_layer_at_or_beyond_num_layers_is_rejected_whole(layer, kept):
    parsed = parse_kv_signal(signal_buffer(1, layer, [(0, 0, 4)]).numpy(), num_layers=40)
    if kept:
        assert parsed.problems == [] and parsed.signal.layer == layer
    else:
        assert parsed.signal is None
        assert parsed.problems == [f"layer {layer} out of range [0, 39]; signal of 1 tasks dropped"]


def test_without_num_layers_any_non_negative_layer_is_accepted():
    assert parse_kv_signal(signal_buffer(1, 40, [(0, 0, 4)]).numpy()).signal.layer == 40


class Messager:
    """The attributes ``MessagerStep.handle_buffer`` reads, as a real ``CacheMessagerV1`` has them."""

    def __init__(self, **attributes):
        self.engine_cache_tasks = [{} for _ in range(4)]
        self.engine_cache_task_thread_lock = threading.Lock()
        self.idx_cache_task_dict = {}
        self.cache_prefilled_engine_ids_queue = queue.Queue()
        vars(self).update(attributes)


@pytest.mark.parametrize(
    "attributes, dropped",
    [
        ({"num_layers": 2}, True),
        ({"num_layers": np.int64(2)}, True),
        ({}, False),  # a messager without num_layers keeps the behaviour of before
        ({"num_layers": None}, False),
        ({"num_layers": "2"}, False),
        ({"num_layers": 0}, False),
    ],
)
def test_handle_buffer_logs_and_drops_a_signal_beyond_the_messagers_layers(caplog, attributes, dropped):
    messager = Messager(**attributes)
    step = make_step(messager, "ordered", logging.getLogger("test_kv_signal.step"), "test: ")
    with caplog.at_level(logging.WARNING, logger="test_kv_signal.step"):
        assert step.handle_buffer(signal_buffer(1, 2, [(1, 0, 4)]).numpy())
    warnings = [record.getMessage() for record in caplog.records]
    if dropped:
        assert warnings == ["test: malformed kv signal: layer 2 out of range [0, 1]; signal of 1 tasks dropped"]
        assert messager.engine_cache_tasks[1] == {}
    else:
        assert warnings == []
        assert messager.engine_cache_tasks[1] == {"prefilled_layer_idx": 2, "prefilled_token_num": 4}


def test_handle_buffer_still_releases_layer_zero_within_num_layers():
    messager = Messager(num_layers=2)
    step = make_step(messager, "ordered", logging.getLogger("test_kv_signal.step"), "test: ")
    step.attach()
    messager.idx_cache_task_dict[1] = {"request_id": "A", "need_prefill_tokens": 4}
    assert step.handle_buffer(signal_buffer(1, 0, [(1, 0, 4)]).numpy())
    assert messager.cache_prefilled_engine_ids_queue.get_nowait() == [(1, 4)]


UPSTREAM_FILES = Path(__file__).resolve().parents[2].parent / "shared" / "upstream"


@pytest.mark.skipif(not UPSTREAM_FILES.is_dir(), reason="no ../shared/upstream: the real upstream files are absent")
def test_every_real_cache_messager_v1_keeps_num_layers_so_the_layer_bound_applies():
    files = [
        path for path in sorted(UPSTREAM_FILES.glob("cache_messager@*.py")) if "CacheMessagerV1" in path.read_text()
    ]
    assert files
    for path in files:
        cls = analysis.target_class_node(ast.parse(path.read_text(encoding="utf-8")))
        init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
        stores = [
            ast.unparse(node)
            for node in ast.walk(init)
            if isinstance(node, ast.Assign) and "num_layers" in ast.unparse(node)
        ]
        assert "self.num_layers = num_layers" in stores, path.name
