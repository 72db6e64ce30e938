"""GPU end-to-end test of the plugin with a real FastDeploy: router, TP2 prefill server, decode server.

The workload is built to hit the cache messager race: concurrent long prompts, prefilled in chunks (small
``--max-num-batched-tokens``), while ``FD_PD_FIX_INJECT`` holds tensor-parallel rank 1's registrations back behind its
layer-0 signals. Pass: every request completes within the deadline, the greedy outputs equal those of a mixed
(non-disaggregated) server, and ``fastdeploy-pd-fix diagnose`` finds the prefill ranks' batch sequences equal (which
also proves the plugin ran in the cache messagers). A hang fails with every rank's cache messager log and diagnose's
verdict in the message, and all logs copied to the artifacts directory.

A/B: with ``FD_E2E_EXPECT_UNFIXED=1`` (the installed release lacks #8034) the same run without the fix is expected
to hang (strict xfail). Without GPUs, FastDeploy or the model the module skips with one reason
(``FD_E2E_REQUIRED=1``: fails instead). Settings: see ``fastdeploy_servers``. On a GPU machine:
``bash ci/run_gpu_e2e.sh``.
"""

import os

import pytest
from e2e import fastdeploy_servers as fd
from e2e.orchestration import RequestsHung, check_outputs_equal

GPU_COUNT, GPU_PROBLEM = fd.detect_gpus()
SETTINGS = fd.E2ESettings.from_env(os.environ, gpu_count=GPU_COUNT)
MISSING = fd.prerequisite_problems(SETTINGS, GPU_COUNT, GPU_PROBLEM, fd.probe_fastdeploy(SETTINGS.python))
if MISSING:
    if SETTINGS.required:
        pytest.fail(fd.skip_reason(MISSING) + " (FD_E2E_REQUIRED=1)", pytrace=False)
    pytest.skip(fd.skip_reason(MISSING), allow_module_level=True)

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(SETTINGS.test_timeout_s)]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("pd-e2e")


@pytest.fixture(scope="module")
def artifacts_root(run_root):
    return SETTINGS.artifacts_dir or run_root / "artifacts"


@pytest.fixture(scope="module")
def payloads():
    return [fd.completion_payload(prompt, SETTINGS.max_tokens) for prompt in fd.long_prompts(SETTINGS.requests)]


@pytest.fixture(scope="module")
def reference_texts(request, run_root, artifacts_root, payloads):
    """Outputs of a mixed server on the same prompts. It is stopped before any PD server starts (same GPUs); the
    finalizer covers a failure on the way."""
    mixed = fd.mixed_deployment(SETTINGS, run_root / "mixed-reference", artifacts_root / "mixed-reference")
    request.addfinalizer(mixed.teardown)
    mixed.start()
    texts = mixed.run_workload(payloads, SETTINGS.deadline_s)
    mixed.teardown()
    return texts


@pytest.fixture
def start_pd(request, run_root, artifacts_root):
    """Starts a router + prefill + decode deployment; its teardown is registered before it starts."""

    def start(label, plugin_env):
        deployment = fd.pd_deployment(SETTINGS, run_root / label, artifacts_root / label, label, plugin_env)
        request.addfinalizer(deployment.teardown)
        deployment.start()
        return deployment

    return start


def test_pd_with_plugin_completes_and_matches_mixed_under_registration_delay(start_pd, reference_texts, payloads):
    pd = start_pd("pd-plugin-ordered", fd.PLUGIN_ORDERED)
    texts = pd.run_workload(payloads, SETTINGS.deadline_s)
    check_outputs_equal(texts, reference_texts, SETTINGS.max_mismatches)
    code, report = pd.diagnose()
    assert code == 0, f"fastdeploy-pd-fix diagnose on the prefill logs: exit code {code}\n{report}"


@pytest.mark.skipif(not SETTINGS.expect_unfixed, reason="FD_E2E_EXPECT_UNFIXED=1 not set (release has #8034?)")
@pytest.mark.xfail(
    strict=True, raises=RequestsHung, reason="without #8034 or the fix, the prefill cache messager ranks deadlock"
)
def test_pd_without_fix_hangs_on_release_lacking_8034(start_pd, payloads):
    pd = start_pd(f"pd-unfixed-{SETTINGS.unfixed_plugin}", SETTINGS.unfixed_plugin_env)
    pd.run_workload(payloads, SETTINGS.unfixed_deadline_s)
