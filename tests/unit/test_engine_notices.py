"""The engine-side patch (plugin/engine/patch.py), in process, on our own model of the engine
(support/engine_model.py): each wrapper, the target checks and standing aside, idempotence, the switches, errors that
never reach the engine, and the fence property with two reader threads."""

import importlib.util
import logging
import sys
import threading
import types

import pytest
from support.engine_model import EngineRequest, OneBatchMailbox, ResourceManagerV1, SplitwiseConnector, admit
from support.upstream_files import TARGET_FILES, needs_upstream

from fastdeploy_pd_fix.adapters.messager_step import strip_notices
from fastdeploy_pd_fix.analysis import CANNOT_RACE, analyse_source
from fastdeploy_pd_fix.plugin.engine import patch as engine
from fastdeploy_pd_fix.plugin.engine.patch import (
    CONNECTOR,
    MANIFEST,
    RESOURCE_MANAGER,
    patch_engine_class,
    unpatch_engine_class,
)
from fastdeploy_pd_fix.policy.notice import (
    ABORT,
    ENGINE,
    FENCE,
    NOTICE_KEY,
    ORPHAN,
    encode,
    engine_notice,
    is_notice,
    orphan_notice,
    split_notices,
)
from fastdeploy_pd_fix.target import RESOURCE_MANAGER_MODULE, SCRIPT_PATH

DEADLINE = 5.0  # seconds; every wait below ends on a handshake long before it


@pytest.fixture(autouse=True)
def plugin_switches(monkeypatch):
    for name in ("FD_PD_FIX", "FD_PD_FIX_MODE", "FD_PD_FIX_ENGINE_NOTICES", "FD_PD_FIX_PATCH_NON_RACING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine, "_warned", {})  # every test sees its own first warnings
    yield monkeypatch
    for cls in (ResourceManagerV1, SplitwiseConnector):
        unpatch_engine_class(cls)


@pytest.fixture
def patched():
    records = [
        patch_engine_class(ResourceManagerV1, RESOURCE_MANAGER),
        patch_engine_class(SplitwiseConnector, CONNECTOR),
    ]
    assert [record.decision for record in records] == ["patched", "patched"], records
    return records


def notices_of(mailbox):
    """The notices of every batch put, one list per batch (P-part items and the engine's announcement left out)."""
    return [[notice for notice in split_notices(batch)[1] if notice.kind != ENGINE] for batch in mailbox.batches]


def engine_with(mailbox, **options):
    resource_manager = ResourceManagerV1(**options)
    return resource_manager, SplitwiseConnector(None, mailbox, resource_manager)


def test_the_engine_announces_itself_at_the_head_of_its_first_batch_only(patched):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("T", 8))
    admit(resource_manager, connector, EngineRequest("O", 8, transfer=False))
    announcements = [
        (batch_number, position, notice.request_id)
        for batch_number, batch in enumerate(mailbox.batches)
        for position, notice in enumerate(split_notices(batch)[1])
        if notice.kind == ENGINE
    ]
    assert announcements == [(0, 0, engine.ANNOUNCER)] and mailbox.batches[0][0][NOTICE_KEY]


def test_a_put_racing_the_first_one_comes_after_the_announcement(patched):
    # Two prepare threads put at once: the second put waits for the first, so the announcement heads the stream.
    entered, release = threading.Event(), threading.Event()

    class SlowFirstPut(OneBatchMailbox):
        def put_cache_info(self, cache_info):
            if not self.batches:
                entered.set()
                assert release.wait(5), "never released"
            super().put_cache_info(cache_info)

    mailbox = SlowFirstPut(0)
    resource_manager, connector = engine_with(mailbox)
    first = threading.Thread(target=connector.engine_worker_queue.put_cache_info, args=([{"request_id": "A"}],))
    first.start()
    assert entered.wait(5), "the first put did not start"
    second = threading.Thread(target=connector.engine_worker_queue.put_cache_info, args=([{"request_id": "B"}],))
    second.start()
    release.set()
    for thread in (first, second):
        thread.join(5)
    assert [[item["request_id"] for item in batch] for batch in mailbox.batches] == [
        [f"{NOTICE_KEY}:{ENGINE}:{engine.ANNOUNCER}", "A"],
        ["B"],
    ]


def test_no_announcement_off_the_prefill_role_and_unpatching_restores_the_put(patched):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox, splitwise_role="decode")
    connector.engine_worker_queue.put_cache_info([{"request_id": "A"}])
    assert mailbox.batches == [[{"request_id": "A"}]]
    prefill_mailbox = OneBatchMailbox(0)
    original_put = prefill_mailbox.put_cache_info
    engine_with(prefill_mailbox)
    assert prefill_mailbox.put_cache_info != original_put
    unpatch_engine_class(SplitwiseConnector)
    assert prefill_mailbox.put_cache_info == original_put


def test_abort_puts_abort_then_fence_before_the_original_frees_the_slot(patched):
    class SnapshotMailbox(OneBatchMailbox):
        def put_cache_info(self, cache_info):
            slot_free.append(resource_manager.stop_flags[0])
            super().put_cache_info(cache_info)

    slot_free = []
    mailbox = SnapshotMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("A", 32))
    resource_manager.schedule_chunk("A", 8)
    resource_manager.schedule_chunk("A", 8)
    resource_manager.trigger_abort("A")  # resets num_computed_tokens to 0, as FastDeploy's _trigger_abort does
    resource_manager.recycle_abort_task("A")

    abort_batch, fence_batch = notices_of(mailbox)[1:]
    assert [(n.kind, n.slot, n.request_id, n.value) for n in abort_batch] == [(ABORT, 0, "A", 16)]
    assert [n.kind for n in fence_batch] == [FENCE] and len(mailbox.batches[2]) == 1
    assert (
        slot_free == [False, False, False] and resource_manager.stop_flags[0] and "A" not in resource_manager.requests
    )


@pytest.mark.parametrize(
    "matched, chunks, emitted_end",
    [(0, [], None), (16, [], None), (16, [8], 24), (0, [8, 8, 8], 24)],
    ids=["nothing launched", "prefix hit, nothing launched", "prefix hit, one chunk", "three chunks"],
)
def test_emitted_end_is_the_end_of_the_last_launched_chunk(patched, matched, chunks, emitted_end):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("A", 32), matched_tokens=matched)
    for tokens in chunks:
        resource_manager.schedule_chunk("A", tokens)
    resource_manager.trigger_abort("A")
    resource_manager.recycle_abort_task("A")
    assert notices_of(mailbox)[1][0].value == emitted_end


def test_orphans_are_announced_in_one_batch_before_they_run(patched):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    requests = [EngineRequest("O1", 5, transfer=False), EngineRequest("T", 7), EngineRequest("O2", 9, transfer=False)]
    for request in requests:
        resource_manager.preallocate_resource_in_p(request)
    connector.send_cache_info_to_messager(requests, 0)  # the P-part of T
    running_when_put = []
    original_put = mailbox.put_cache_info
    mailbox.put_cache_info = lambda items: (
        running_when_put.append(list(resource_manager.running)),
        original_put(items),
    )
    resource_manager.add_request_in_p(requests)

    assert [(n.kind, n.slot, n.request_id, n.value) for n in notices_of(mailbox)[1]] == [
        (ORPHAN, 0, "O1", 5),
        (ORPHAN, 2, "O2", 9),
    ]
    assert running_when_put == [[]] and resource_manager.running == requests


def test_an_aborted_orphan_gets_an_abort_too_and_requests_with_transfer_get_no_orphan(patched):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("T", 8))
    admit(resource_manager, connector, EngineRequest("O", 8, transfer=False))
    resource_manager.schedule_chunk("O", 4)
    resource_manager.trigger_abort("O")
    resource_manager.recycle_abort_task("O")
    kinds = [[(n.kind, n.value) for n in batch] for batch in notices_of(mailbox)]
    assert kinds == [[], [(ORPHAN, 8)], [(ABORT, 4)], [(FENCE, None)]]  # T's P-part, O's admission, O's abort


def test_no_notice_when_the_original_frees_nothing(patched):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("A", 8))
    resource_manager.recycle_abort_task("A")  # abort not triggered: the original keeps the slot
    resource_manager.recycle_abort_task("unknown")
    assert len(mailbox.batches) == 1 and not resource_manager.stop_flags[0]


@pytest.mark.parametrize("role", ["decode", "mixed", None])
def test_other_roles_put_nothing(patched, role, caplog):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox, splitwise_role=role)
    if role is None:
        resource_manager.config = types.SimpleNamespace()  # a release that keeps the role elsewhere
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        admit(resource_manager, connector, EngineRequest("O", 8, transfer=False))
        resource_manager.trigger_abort("O")
        resource_manager.recycle_abort_task("O")
    assert mailbox.batches == [] and resource_manager.stop_flags[0]
    assert ("splitwise role not found" in caplog.text) == (role is None)


def test_without_a_known_mailbox_it_logs_once_and_the_original_runs(patched, caplog):
    resource_manager = ResourceManagerV1()
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        for name in ("A", "B"):
            resource_manager.preallocate_resource_in_p(EngineRequest(name, 8))
            resource_manager.trigger_abort(name)
            resource_manager.recycle_abort_task(name)
    assert caplog.text.count("no cache-info mailbox known") == 1 and all(resource_manager.stop_flags)


def test_each_resource_manager_uses_the_mailbox_of_its_own_connector(patched, caplog):
    first, second = OneBatchMailbox(0), OneBatchMailbox(0)
    manager_one, connector_one = engine_with(first)
    manager_two, connector_two = engine_with(second)
    admit(manager_one, connector_one, EngineRequest("O1", 4, transfer=False))
    admit(manager_two, connector_two, EngineRequest("O2", 4, transfer=False))
    assert [n.request_id for n in notices_of(first)[0]] == ["O1"]
    assert [n.request_id for n in notices_of(second)[0]] == ["O2"]
    # A resource manager built without a connector: two mailboxes in the process, so none is guessed.
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        admit(ResourceManagerV1(), connector_one, EngineRequest("O3", 4, transfer=False))
    assert "no cache-info mailbox known" in caplog.text and len(first.batches) == 1


def test_a_lone_mailbox_serves_a_resource_manager_built_without_a_connector(patched):
    mailbox = OneBatchMailbox(0)
    engine_with(mailbox)
    resource_manager = ResourceManagerV1()  # e.g. a resource manager that delegates to an inner one
    resource_manager.preallocate_resource_in_p(EngineRequest("O", 4, transfer=False))
    resource_manager.add_request_in_p([resource_manager.requests["O"]])
    assert [n.request_id for n in notices_of(mailbox)[0]] == ["O"]


class BrokenMailbox:
    def __init__(self):
        self.calls = 0

    def put_cache_info(self, cache_info):
        self.calls += 1
        raise ConnectionError("manager gone")


def test_errors_in_our_part_never_reach_the_engine(patched, caplog):
    mailbox = BrokenMailbox()
    resource_manager, connector = engine_with(mailbox)
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        for name in ("A", "B"):
            resource_manager.preallocate_resource_in_p(EngineRequest(name, 8, transfer=False))
            resource_manager.add_request_in_p([resource_manager.requests[name]])
        assert [request.request_id for request in resource_manager.running] == ["A", "B"]
        for name in ("A", "B"):
            resource_manager.trigger_abort(name)
            resource_manager.recycle_abort_task(name)
    assert mailbox.calls == 4 and all(resource_manager.stop_flags) and resource_manager.requests == {}
    assert caplog.text.count("recycle_abort_task: notice not sent") == 1
    assert caplog.text.count("add_request_in_p: notice not sent") == 1 and "ConnectionError" in caplog.text


def test_a_persistent_error_is_logged_with_its_count_at_the_1st_10th_and_100th_time(patched, caplog):
    # Every admission fails to put its notice: weeks of that must leave a trace, not one line nor a flood.
    mailbox = BrokenMailbox()
    resource_manager, connector = engine_with(mailbox)
    orphan = EngineRequest("O", 8, transfer=False)
    resource_manager.preallocate_resource_in_p(orphan)
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        for _ in range(150):
            resource_manager.add_request_in_p([orphan])
    assert mailbox.calls == 150 and len(resource_manager.running) == 150  # the original ran every time
    lines = [line for line in caplog.text.splitlines() if "add_request_in_p: notice not sent" in line]
    assert [line.split("(")[-1] for line in lines] == [
        "1 time in this process; logged again at the 10th)",
        "10 times in this process; logged again at the 100th)",
        "100 times in this process; logged again at the 1000th)",
    ]


def test_a_request_we_cannot_read_gets_no_notice_and_the_original_runs(patched, caplog):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("A", 8))
    del resource_manager.requests["A"].prefill_end_index  # a release without the attribute: not knowing is not None
    resource_manager.trigger_abort("A")
    empty = EngineRequest("E", 0, transfer=False)  # an orphan notice needs a positive need
    with caplog.at_level(logging.WARNING, logger="fastdeploy_pd_fix"):
        resource_manager.recycle_abort_task("A")
        resource_manager.preallocate_resource_in_p(empty)
        resource_manager.add_request_in_p([empty])
    assert len(mailbox.batches) == 1 and "A" not in resource_manager.requests and empty.idx == 0  # A's slot freed
    assert resource_manager.running == [empty]
    assert "AttributeError" in caplog.text and "ValueError" in caplog.text


def test_requests_as_an_iterator_are_passed_on_untouched(patched):
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    request = EngineRequest("O", 4, transfer=False)
    resource_manager.preallocate_resource_in_p(request)
    resource_manager.add_request_in_p(iter([request]))
    assert resource_manager.running == [request] and mailbox.batches == []


def test_patching_is_idempotent_and_the_originals_stay_reachable(patched):
    original = engine.patch_state(ResourceManagerV1).originals["recycle_abort_task"]
    assert ResourceManagerV1.recycle_abort_task.__wrapped__ is original
    assert ResourceManagerV1.recycle_abort_task.__fd_pd_fix__ and SplitwiseConnector.__init__.__fd_pd_fix__
    again = patch_engine_class(ResourceManagerV1, RESOURCE_MANAGER)
    assert again.decision == "already patched" and ResourceManagerV1.recycle_abort_task.__wrapped__ is original
    unpatch_engine_class(ResourceManagerV1)
    assert ResourceManagerV1.recycle_abort_task is original and engine.patch_state(ResourceManagerV1) is None


def _unrecognised_classes():
    class NoAdmission:
        def recycle_abort_task(self, request_id):
            pass

    class OtherParameters(ResourceManagerV1):
        def recycle_abort_task(self, request_ids):
            pass

    class AnnouncesItself(ResourceManagerV1):
        def recycle_abort_task(self, request_id):
            return "fastdeploy_pd_fix_notice"

    class UsesTheUpstreamedPackage(ResourceManagerV1):
        def add_request_in_p(self, requests):
            from fastdeploy.cache_manager.layer0_release import notice  # noqa: F401

    namespace = {}
    exec(  # a class whose source cannot be read
        "class NoSource:\n def recycle_abort_task(self, request_id): pass\n"
        " def add_request_in_p(self, requests): pass\n",
        namespace,
    )
    return [
        (NoAdmission, "add_request_in_p is missing"),
        (OtherParameters, "recycle_abort_task(self, request_ids) does not start with (self, request_id)"),
        (AnnouncesItself, f"already announces slot lifecycles (its source mentions {NOTICE_KEY})"),
        (UsesTheUpstreamedPackage, "already announces slot lifecycles (its source mentions layer0_release)"),
        (namespace["NoSource"], "source not readable"),
    ]


@pytest.mark.parametrize("cls, reason", _unrecognised_classes(), ids=lambda value: getattr(value, "__name__", None))
def test_an_unrecognised_class_is_left_alone_with_one_warning(cls, reason, caplog):
    before = dict(vars(cls))
    with caplog.at_level(logging.INFO, logger="fastdeploy_pd_fix"):
        record = patch_engine_class(cls, RESOURCE_MANAGER)
    assert record.decision == "stood aside" and reason in record.reason, record.reason
    assert dict(vars(cls)) == before
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "stood aside" in caplog.text


@pytest.mark.parametrize(
    "switches, reason",
    [
        ({"FD_PD_FIX": "0"}, "FD_PD_FIX=0 switches the plugin off"),
        ({"FD_PD_FIX_MODE": "upstream"}, "FD_PD_FIX_MODE=upstream: only ordered mode reads notices"),
        ({"FD_PD_FIX_MODE": "observe"}, "FD_PD_FIX_MODE=observe: only ordered mode reads notices"),
        ({"FD_PD_FIX_ENGINE_NOTICES": "0"}, "FD_PD_FIX_ENGINE_NOTICES is off"),
    ],
)
def test_switched_off_notices_patch_nothing_and_emit_nothing(plugin_switches, switches, reason, caplog):
    for name, value in switches.items():
        plugin_switches.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="fastdeploy_pd_fix"):
        records = [
            patch_engine_class(ResourceManagerV1, RESOURCE_MANAGER),
            patch_engine_class(SplitwiseConnector, CONNECTOR),
        ]
    assert all(record.decision == "stood aside" and reason in record.reason for record in records)
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"] and "engine notices off" in caplog.text
    assert not hasattr(ResourceManagerV1.recycle_abort_task, "__fd_pd_fix__")
    mailbox = OneBatchMailbox(0)
    resource_manager, connector = engine_with(mailbox)
    admit(resource_manager, connector, EngineRequest("O", 4, transfer=False))
    resource_manager.trigger_abort("O")
    resource_manager.recycle_abort_task("O")
    assert mailbox.batches == []


@needs_upstream
@pytest.mark.parametrize("messager", TARGET_FILES, ids=lambda path: path.name)
def test_the_engine_side_stands_aside_where_the_releases_messagers_cannot_race(plugin_switches, tmp_path, messager):
    """The resource manager of a FastDeploy package whose own cache_messager.py reports every registration (before
    #7724): its messagers stand aside, so nobody would read a notice; FD_PD_FIX_PATCH_NON_RACING=1 patches anyway."""
    module_file = (tmp_path / RESOURCE_MANAGER_MODULE.replace(".", "/")).with_suffix(".py")
    module_file.parent.mkdir(parents=True)
    module_file.write_text(
        "from support.engine_model import ResourceManagerV1 as Model\n\n\nclass ResourceManagerV1(Model):\n    pass\n"
    )
    (tmp_path / SCRIPT_PATH).parent.mkdir(parents=True)
    (tmp_path / SCRIPT_PATH).write_bytes(messager.read_bytes())
    spec = importlib.util.spec_from_file_location(RESOURCE_MANAGER_MODULE, module_file)
    module = importlib.util.module_from_spec(spec)
    plugin_switches.setitem(sys.modules, RESOURCE_MANAGER_MODULE, module)
    spec.loader.exec_module(module)
    release_class = module.ResourceManagerV1
    cannot_race = analyse_source(messager.read_text(encoding="utf-8")).cannot_race
    assert engine.messager_cannot_race(release_class) == cannot_race
    record = patch_engine_class(release_class, RESOURCE_MANAGER)
    assert record.decision == ("stood aside" if cannot_race else "patched"), record.reason
    assert (CANNOT_RACE in record.reason) == cannot_race
    unpatch_engine_class(release_class)
    plugin_switches.setenv("FD_PD_FIX_PATCH_NON_RACING", "1")
    assert patch_engine_class(release_class, RESOURCE_MANAGER).decision == "patched"
    unpatch_engine_class(release_class)


def test_the_release_messager_is_parsed_once_per_process(plugin_switches, tmp_path, monkeypatch):
    """The resource manager and the connector of one package both ask whether its messagers can race: one parse."""
    package = tmp_path / "fastdeploy"
    (package / "engine").mkdir(parents=True)
    (tmp_path / SCRIPT_PATH).parent.mkdir(parents=True)
    (tmp_path / SCRIPT_PATH).write_text("class CacheMessagerV1:\n    pass\n", encoding="utf-8")
    parsed = []
    monkeypatch.setattr(engine, "analyse_source", lambda source: parsed.append(source) or analyse_source(source))
    classes = []
    for name in ("resource_manager_v1", "connector"):
        module = types.ModuleType(f"fastdeploy.engine.{name}")
        module.__file__ = str(package / "engine" / f"{name}.py")
        plugin_switches.setitem(sys.modules, module.__name__, module)
        classes.append(type("Engine", (), {"__module__": module.__name__}))
    assert [engine.messager_cannot_race(cls) for cls in classes] == [False, False]
    assert len(parsed) == 1


def test_an_unknown_notice_switch_keeps_notices_on_and_warns_on_the_decision_line(plugin_switches, caplog):
    plugin_switches.setenv("FD_PD_FIX_ENGINE_NOTICES", "maybe")
    with caplog.at_level(logging.INFO, logger="fastdeploy_pd_fix"):
        record = patch_engine_class(ResourceManagerV1, RESOURCE_MANAGER)
    assert record.decision == "patched" and "FD_PD_FIX_ENGINE_NOTICES='maybe' is not understood" in record.reason
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_patch_engine_module_finds_the_class_by_module_name():
    module = types.ModuleType(RESOURCE_MANAGER.module)
    module.ResourceManagerV1 = ResourceManagerV1
    assert engine.patch_engine_module(module).decision == "patched"
    empty = types.ModuleType(CONNECTOR.module)
    record = engine.patch_engine_module(empty)
    assert record.decision == "stood aside" and record.reason == "no such class"
    assert engine.patch_engine_module(types.ModuleType("fastdeploy.other")) is None


def test_the_manifest_lists_the_engine_side_and_status_says_whether_notices_are_on(plugin_switches, capsys):
    from fastdeploy_pd_fix.plugin.status import print_status

    targets = {patch.target: patch for patch in MANIFEST}
    for target in ("ResourceManagerV1.recycle_abort_task", "ResourceManagerV1.add_request_in_p"):
        assert targets[target].upstream == "none yet" and targets[target].remove_when
    assert "SplitwiseConnector.__init__" in targets
    print_status()
    assert "engine:      notices on: ResourceManagerV1 and SplitwiseConnector are patched" in capsys.readouterr().out
    plugin_switches.setenv("FD_PD_FIX_MODE", "upstream")
    print_status()
    assert "engine:      notices off (FD_PD_FIX_MODE=upstream" in capsys.readouterr().out


class OrderLog:
    def __init__(self):
        self._lock = threading.Lock()
        self.entries = []

    def append(self, entry: str) -> None:
        with self._lock:
            self.entries.append(entry)


def test_the_next_occupant_is_admitted_only_after_every_rank_handled_the_abort(patched):
    """R9 with two messager ranks as reader threads: rank 1 is held inside its handling of the ABORT; the next
    occupant's P-part put (after recycle_abort_task returned and freed the slot) must wait for it."""
    mailbox = OneBatchMailbox(2)
    resource_manager, connector = engine_with(mailbox, max_num_seqs=1)  # one slot: the next request reuses it
    order, stop = OrderLog(), threading.Event()
    rank1_in_abort, release_rank1 = threading.Event(), threading.Event()

    def rank(client_id):
        while not stop.is_set():
            _, notices, problems = split_notices(mailbox.get_cache_info(client_id, timeout=0.05))
            assert not problems
            for notice in notices:
                if notice.kind == ABORT:
                    if client_id == 1:
                        rank1_in_abort.set()
                        release_rank1.wait(DEADLINE)
                    order.append(f"rank {client_id} handled abort of {notice.request_id}")

    ranks = [threading.Thread(target=rank, args=(client_id,), daemon=True) for client_id in (0, 1)]
    for thread in ranks:
        thread.start()
    try:
        admit(resource_manager, connector, EngineRequest("A", 16))
        resource_manager.schedule_chunk("A", 8)
        resource_manager.trigger_abort("A")
        recycle = threading.Thread(target=resource_manager.recycle_abort_task, args=("A",), daemon=True)
        recycle.start()
        recycle.join(DEADLINE)  # the fence put needs every rank to have read ABORT, not to have handled it
        assert not recycle.is_alive() and resource_manager.stop_flags[0]
        assert rank1_in_abort.wait(DEADLINE)

        def admit_next():
            resource_manager.preallocate_resource_in_p(next_request)
            connector.send_cache_info_to_messager([next_request], 0)
            order.append("P-part of B put")
            resource_manager.add_request_in_p([next_request])

        next_request = EngineRequest("B", 16)
        admission = threading.Thread(target=admit_next, daemon=True)
        admission.start()
        assert mailbox.wait_for_blocked_put(DEADLINE)  # B's P-part waits for rank 1 to read FENCE
        assert next_request.idx == 0 and "P-part of B put" not in order.entries
        release_rank1.set()
        admission.join(DEADLINE)
        assert not admission.is_alive()
    finally:
        release_rank1.set()
        stop.set()
        for thread in ranks:
            thread.join(DEADLINE)
    assert order.entries[-1] == "P-part of B put"
    assert set(order.entries[:-1]) == {"rank 0 handled abort of A", "rank 1 handled abort of A"}
    assert [[n.kind for n in batch] for batch in notices_of(mailbox)] == [[], [ABORT], [FENCE], []]


@pytest.mark.parametrize(
    "first_read, announced",
    [
        ([encode(engine_notice("X")), {"request_id": "A"}], "X"),
        ([{"request_id": "A"}, encode(engine_notice("X"))], None),  # not at the head: not the engine's first put
        ([encode(orphan_notice(0, "O", 4))], None),
        ([{NOTICE_KEY: 99, "kind": ENGINE}], None),  # another notice version: not understood
    ],
    ids=["at the head", "elsewhere", "another notice first", "malformed"],
)
def test_the_first_non_empty_read_tells_whether_the_engine_announced_itself(first_read, announced):
    reads = [[], first_read, [encode(engine_notice("Y"))]]
    queue = types.SimpleNamespace(get_cache_info=lambda: reads.pop(0))
    seen, handled = [], []
    strip_notices(
        types.SimpleNamespace(engine_worker_queue=queue), handled.append, logging.getLogger("t"), "", seen.append
    )
    results = [queue.get_cache_info() for _ in range(3)]
    assert [getattr(notice, "request_id", None) for notice in seen] == [announced]  # once, at the first items
    assert results[0] == [] and all(not is_notice(item) for result in results for item in result)


def test_a_subclass_that_calls_the_patched_methods_puts_the_notices_too(patched):
    # FastDeploy's ResourceManagerV2 subclasses V1 and admits through super().add_request_in_p: the wrappers on V1's
    # methods run there too, so its orphans are announced like V1's.
    class ResourceManagerV2(ResourceManagerV1):
        def add_request_in_p(self, requests):
            return super().add_request_in_p(list(requests))

    mailbox = OneBatchMailbox(0)
    resource_manager = ResourceManagerV2()
    connector = SplitwiseConnector(None, mailbox, resource_manager)
    admit(resource_manager, connector, EngineRequest("O", 6, transfer=False))
    assert [(n.kind, n.request_id, n.value) for batch in notices_of(mailbox) for n in batch] == [(ORPHAN, "O", 6)]
