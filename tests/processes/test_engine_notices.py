"""The engine-side patch through the installed start-up hook: a fresh interpreter with a fake ``fastdeploy`` package
on PYTHONPATH (its two engine modules re-export our engine model, support/engine_model.py) gets both classes patched
as it imports them, and puts the notices into the mailbox; the switches leave both untouched."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.installed import require_plugin_installed

from fastdeploy_pd_fix.plugin.engine import patch as engine

TESTS = Path(__file__).resolve().parents[1]
#: The fake package: module path -> source. The engine modules are the ones target.ENGINE_MODULES names.
FAKE_FASTDEPLOY = {
    "fastdeploy/__init__.py": "",
    "fastdeploy/engine/__init__.py": "",
    "fastdeploy/engine/sched/__init__.py": "",
    "fastdeploy/engine/sched/resource_manager_v1.py": "from support.engine_model import ResourceManagerV1  # noqa\n",
    "fastdeploy/splitwise/__init__.py": "",
    "fastdeploy/splitwise/splitwise_connector.py": "from support.engine_model import SplitwiseConnector  # noqa\n",
}
ENGINE_RUN = textwrap.dedent(
    """
    import json
    from fastdeploy.engine.sched.resource_manager_v1 import ResourceManagerV1
    from fastdeploy.splitwise.splitwise_connector import SplitwiseConnector
    from fastdeploy_pd_fix import bootstrap
    from fastdeploy_pd_fix.policy.notice import split_notices
    from support.engine_model import EngineRequest, OneBatchMailbox, admit

    mailbox = OneBatchMailbox(0)
    resource_manager = ResourceManagerV1()
    connector = SplitwiseConnector(None, mailbox, resource_manager)
    admit(resource_manager, connector, EngineRequest("orphan", 4, transfer=False))
    admit(resource_manager, connector, EngineRequest("aborted", 16))
    resource_manager.schedule_chunk("aborted", 8)
    resource_manager.trigger_abort("aborted")
    resource_manager.recycle_abort_task("aborted")
    print(json.dumps({
        "patched": [
            getattr(ResourceManagerV1.recycle_abort_task, "__fd_pd_fix__", False),
            getattr(ResourceManagerV1.add_request_in_p, "__fd_pd_fix__", False),
            getattr(SplitwiseConnector.__init__, "__fd_pd_fix__", False),
        ],
        "notices": [
            [notice.kind, notice.request_id if notice.kind != "fence" else "", notice.slot, notice.value]
            for batch in mailbox.batches for notice in split_notices(batch)[1]
        ],
        "slot_freed": resource_manager.stop_flags[1],
        "state": bootstrap.state,
    }))
    """
)


@pytest.fixture(scope="module", autouse=True)
def plugin_installed():
    require_plugin_installed()


@pytest.fixture
def fastdeploy_root(tmp_path):
    for path, source in FAKE_FASTDEPLOY.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    return tmp_path


def run_engine(root, **env):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FD_PD_FIX")}
    environment.update(env, PYTHONPATH=os.pathsep.join([str(root), str(TESTS)]))
    completed = subprocess.run(
        [sys.executable, "-c", ENGINE_RUN], env=environment, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_the_engine_modules_are_patched_at_import_and_put_the_notices(fastdeploy_root):
    result, stderr = run_engine(fastdeploy_root)
    assert result["state"]["import_hook"] and result["patched"] == [True, True, True]
    assert result["notices"] == [
        ["engine", engine.ANNOUNCER, None, None],  # at the head of the first batch put (the orphan's)
        ["orphan", "orphan", 0, 4],
        ["abort", "aborted", 1, 8],
        ["fence", "", None, None],
    ]
    assert result["slot_freed"]
    decisions = [line for line in stderr.splitlines() if "engine notices patched in" in line]
    assert len(decisions) == 2 and all(" INFO " in line for line in decisions), stderr
    assert "patched support.engine_model.ResourceManagerV1 (mode=ordered" in stderr


@pytest.mark.parametrize(
    "env, said",
    [
        ({"FD_PD_FIX_MODE": "upstream"}, "engine notices off"),
        ({"FD_PD_FIX_ENGINE_NOTICES": "0"}, "engine notices off"),
        ({"FD_PD_FIX": "0"}, None),  # nothing installed, nothing said
    ],
)
def test_switched_off_the_engine_runs_unpatched_and_puts_no_notice(fastdeploy_root, env, said):
    result, stderr = run_engine(fastdeploy_root, **env)
    assert result["patched"] == [False, False, False] and result["notices"] == [] and result["slot_freed"]
    if said is None:
        assert result["state"]["disabled"] and "fastdeploy_pd_fix" not in stderr
    else:
        assert stderr.count(said) == 2 and "stood aside" in stderr
