"""make-patch's engine side (fastdeploy_pd_fix/upstream/rewrite_engine.py) on our own model of the two engine files
(tests/support/engine_model.py, rendered as FastDeploy files): the edits are line insertions only, the patched
classes put the notices the plugin puts, and a file it does not recognise is refused with the reason."""

import difflib
import importlib.util
import sys
import types

import pytest
from support import engine_model

from fastdeploy_pd_fix.adapters import engine_notices
from fastdeploy_pd_fix.plugin.engine.patch import CONNECTOR, RESOURCE_MANAGER, check_target
from fastdeploy_pd_fix.policy import notice
from fastdeploy_pd_fix.upstream.rewrite_engine import (
    CONNECTOR_PATH,
    IMPORT,
    RESOURCE_MANAGER_PATH,
    EngineNotRecognised,
    patch_connector,
    patch_engine,
    patch_resource_manager,
)

SOURCES = engine_model.fastdeploy_files()
RESOURCE_MANAGER_SOURCE, CONNECTOR_SOURCE = SOURCES[RESOURCE_MANAGER_PATH], SOURCES[CONNECTOR_PATH]


def added_lines(before: str, after: str):
    """The lines ``after`` adds; fails if it removes or changes any line of ``before``."""
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    assert not [line for line in diff if line.startswith("- ")], "\n".join(diff)
    return [line[2:] for line in diff if line.startswith("+ ")]


def load(path, source: str) -> types.ModuleType:
    """``source`` written to ``path`` and run from there as a module (so that ``inspect`` finds its source), with the
    layer0_release package it imports being ours."""
    path.write_text(source, encoding="utf-8")
    adapters = types.ModuleType("layer0_release.adapters")
    adapters.engine_notices = engine_notices
    stubs = {
        "fastdeploy.cache_manager.layer0_release": types.ModuleType("layer0_release"),
        "fastdeploy.cache_manager.layer0_release.adapters": adapters,
        "fastdeploy.utils": types.ModuleType("utils"),
    }
    stubs["fastdeploy.utils"].llm_logger = None
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # inspect.getsource looks the class's module up there
        spec.loader.exec_module(module)
        return module
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


@pytest.fixture
def engine(tmp_path):
    """The patched resource manager and connector classes, loaded from files."""
    patched = patch_engine(SOURCES)
    resource_manager = load(tmp_path / "patched_resource_manager_v1.py", patched[RESOURCE_MANAGER_PATH])
    connector = load(tmp_path / "patched_splitwise_connector.py", patched[CONNECTOR_PATH])
    yield resource_manager.ResourceManagerV1, connector.SplitwiseConnector
    for name in ("patched_resource_manager_v1", "patched_splitwise_connector"):
        sys.modules.pop(name, None)


def test_the_edits_only_add_lines_and_the_import_goes_where_isort_puts_it():
    patched = patch_engine(SOURCES)
    added = added_lines(RESOURCE_MANAGER_SOURCE, patched[RESOURCE_MANAGER_PATH])
    assert added[0] == IMPORT
    lines = patched[RESOURCE_MANAGER_PATH].splitlines()
    assert lines.index(IMPORT) == lines.index("from fastdeploy.utils import llm_logger") - 1
    assert sum("engine_notices." in line for line in added) == 2  # one call per method
    assert any(line.strip().startswith("def _layer0_release_put(self, batches):") for line in added)
    connector_added = [line.strip() for line in added_lines(CONNECTOR_SOURCE, patched[CONNECTOR_PATH])]
    assert connector_added[0] == IMPORT
    assert connector_added[-4:] == [
        "self.resource_manager.layer0_release_mailbox = self.engine_worker_queue",
        "if engine_notices.splitwise_role(self.resource_manager) == engine_notices.PREFILL_ROLE:",
        "put = self.engine_worker_queue.put_cache_info",
        'self.engine_worker_queue.put_cache_info = engine_notices.AnnouncedPut(put, "layer0_release")',
    ]


def test_the_patched_engine_puts_the_notices_the_plugin_puts(engine):
    resource_manager_class, connector_class = engine
    mailbox = engine_model.OneBatchMailbox(num_clients=0)  # records every batch, never waits
    resource_manager = resource_manager_class()
    connector = connector_class(None, mailbox, resource_manager)
    aborted = engine_model.EngineRequest("A", 8)
    engine_model.admit(resource_manager, connector, aborted)
    resource_manager.schedule_chunk("A", 4)
    engine_model.admit(resource_manager, connector, engine_model.EngineRequest("O", 4, transfer=False))
    resource_manager.trigger_abort("A")
    resource_manager.recycle_abort_task("A")
    resource_manager.recycle_abort_task("A")  # already freed: nothing to announce
    notices = [notice.split_notices(batch)[1] for batch in mailbox.batches if notice.is_notice(batch[0])]
    assert [[(n.kind, n.slot, n.request_id, n.value) for n in batch] for batch in notices] == [
        [(notice.ENGINE, None, "layer0_release", None)],  # at the head of the first batch: A's P-part
        [(notice.ORPHAN, 1, "O", 4)],
        [(notice.ABORT, 0, "A", 4)],
        [(notice.FENCE, None, notices[3][0].request_id, None)],
    ]
    assert resource_manager.stop_flags[0] is True  # the original body still ran


def test_the_plugin_stands_aside_on_an_engine_that_carries_the_fix(engine):
    resource_manager_class, connector_class = engine
    assert "already announces slot lifecycles" in check_target(resource_manager_class, RESOURCE_MANAGER)
    assert "already announces slot lifecycles" in check_target(connector_class, CONNECTOR)
    assert check_target(engine_model.ResourceManagerV1, RESOURCE_MANAGER) is None  # the control: unpatched


def test_off_the_prefill_role_nothing_is_put(engine):
    resource_manager_class, connector_class = engine
    mailbox = engine_model.OneBatchMailbox(num_clients=0)
    resource_manager = resource_manager_class(splitwise_role="decode")
    connector_class(None, mailbox, resource_manager)
    resource_manager.add_request_in_p([engine_model.EngineRequest("O", 4, transfer=False)])
    assert mailbox.batches == []


#: (what is changed in the model's resource manager file, the refusal's reason).
UNRECOGNISED = [
    ((), "the base has no"),
    (("def recycle_abort_task(self, request_id)", "def recycle_abort_task(self, rid)"), r"task\(self, rid\) is not"),
    (("def add_request_in_p", "def add_requests_in_p"), "0 method add_request_in_p"),
    (("\n\n\nclass", "\n# layer0_release\n\n\nclass"), "already mentions layer0_release"),
    (("class ResourceManagerV1", "class ResourceManagerV2"), "0 top-level class"),
]


@pytest.mark.parametrize("replacement, reason", UNRECOGNISED)
def test_a_resource_manager_it_does_not_recognise_is_refused_with_the_reason(replacement, reason):
    source = RESOURCE_MANAGER_SOURCE.replace(*replacement) if replacement else None
    with pytest.raises(EngineNotRecognised, match=reason):
        patch_resource_manager(source)


def test_a_connector_that_does_not_store_the_resource_manager_is_refused():
    source = CONNECTOR_SOURCE.replace("self.resource_manager = resource_manager", "self.manager = resource_manager")
    with pytest.raises(EngineNotRecognised, match="stores self.resource_manager 0 times"):
        patch_connector(source)
