"""GPU end-to-end test of the plugin with a real FastDeploy: router, TP2 prefill server, decode server.

The workload is built to hit the cache messager race: concurrent long prompts, prefilled in chunks (small
``--max-num-batched-tokens``), while ``FD_PD_FIX_INJECT=registration_after_barrier:rank=1:...`` makes tensor-parallel
rank 1 alone store each registration late, after the barrier let both ranks through, so that its layer-0 signals
beat their registrations and rank 0's do not. One deployment with the plugin in ordered mode serves, in order:

1. the race wave: every request completes within the deadline with the greedy outputs of a mixed (non-disaggregated)
   server (``FD_DETERMINISTIC_MODE=1``; ``FD_E2E_MAX_MISMATCHES`` is the tolerance without it), and
   ``fastdeploy-pd-fix diagnose`` finds the prefill ranks' batch sequences equal (which also proves the plugin ran);
2. the proof that the race happened: the delayed rank's messager logged ``early layer-0 signal #N`` lines (N > 0)
   and the other rank's count differs. Skipped, with the reason, where ``fastdeploy-pd-fix status`` reports a release
   before #7724 (no race is possible there) or ``FD_E2E_INJECT`` delays no rank on its own;
3. the abort wave: streamed requests closed by the client mid-prefill, then more requests than ``--max-num-seqs``:
   every one of those completes within the deadline with the mixed server's outputs, and diagnose still finds no
   divergence. A prefill instance of release/2.6 (and 2.4, 2.5) records an abort and ignores it (the request
   computes and transfers to the end), so there this wave checks that aborts break nothing; it cannot exercise the
   plugin's abort notices. Those of the prefill logs (``abort of request ... emitted_end=``), if any, are attached
   to the report, not asserted on;
4. the orphan wave: requests sent straight to the prefill server's own API (no router, so no
   ``disaggregate_info``: the engine computes them without a transfer and answers them itself) at the same time as
   routed ones, more than ``--max-num-seqs`` in all: every request of both kinds completes with the mixed server's
   outputs; the prefill engine logged an orphan notice (``engine notice put: orphan of request ...``) for at least
   as many requests as were sent straight to it; every prefill messager rank dropped layer-0 tasks of every
   noticed orphan (``dropped layer-0 task ... belongs to orphan <id>``); diagnose finds no divergence. The notices
   and the drop counts are attached to the report.

A/B: with ``FD_E2E_EXPECT_UNFIXED=1`` (a release with #7724 and without #8034) the same race wave without the fix is
expected to hang (strict xfail). A hang fails with every rank's cache messager log and diagnose's verdict in the
message, and all logs copied to the artifacts directory. Without GPUs, FastDeploy or the model the module skips with
one reason (``FD_E2E_REQUIRED=1``: fails instead). Settings: see ``fastdeploy_servers``. On a GPU machine:
``bash ci/run_gpu_e2e.sh``.
"""

import os

import pytest
from e2e import fastdeploy_servers as fd
from e2e.orchestration import (
    RequestsHung,
    check_outputs_equal,
    describe_closed_streams,
    early_signal_counts,
    engine_abort_notices,
    engine_orphan_notices,
    noticed_orphans,
    orphan_drop_counts,
)

GPU_COUNT, GPU_PROBLEM = fd.detect_gpus()
SETTINGS = fd.E2ESettings.from_env(os.environ, gpu_count=GPU_COUNT)
MISSING = fd.prerequisite_problems(SETTINGS, GPU_COUNT, GPU_PROBLEM, fd.probe_fastdeploy(SETTINGS.python))
if MISSING:
    if SETTINGS.required:
        pytest.fail(fd.skip_reason(MISSING) + " (FD_E2E_REQUIRED=1)", pytrace=False)
    pytest.skip(fd.skip_reason(MISSING), allow_module_level=True)

RELEASE = fd.probe_release(SETTINGS.python)
if not RELEASE.can_race:
    NO_RACE = f"no race to prove: {RELEASE.reason}"
elif SETTINGS.delayed_rank is None:
    NO_RACE = f"FD_E2E_INJECT={SETTINGS.inject!r} delays no rank on its own ({fd.ASYMMETRIC_STAGE}:rank=R:...)"
else:
    NO_RACE = None

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
def refill_payloads():
    return fd.refill_payloads(SETTINGS)


@pytest.fixture(scope="module")
def orphan_wave_payloads():
    """The orphan wave's (routed, direct) payloads."""
    return fd.orphan_wave_payloads(SETTINGS)


@pytest.fixture(scope="module")
def references(request, run_root, artifacts_root, payloads, refill_payloads, orphan_wave_payloads):
    """Outputs of a mixed server on the race wave's, the refill wave's and the orphan wave's prompts (routed ones
    first). It is stopped before any PD server starts (same GPUs); the finalizer covers a failure on the way."""
    mixed = fd.mixed_deployment(SETTINGS, run_root / "mixed-reference", artifacts_root / "mixed-reference")
    request.addfinalizer(mixed.teardown)
    mixed.start()
    routed, direct = orphan_wave_payloads
    texts = {
        "race": mixed.run_workload(payloads, SETTINGS.deadline_s),
        "refill": mixed.run_workload(refill_payloads, SETTINGS.deadline_s),
        "orphan": mixed.run_workload(routed + direct, SETTINGS.deadline_s),
    }
    mixed.teardown()
    return texts


STARTED = []  # every PD deployment of the module: one runs at a time (same GPUs and ports)


def start_pd(request, run_root, artifacts_root, label, plugin_env):
    """Stops the deployments started before, then starts a router + prefill + decode deployment; its teardown is
    registered before it starts."""
    for earlier in STARTED:
        earlier.teardown()
    deployment = fd.pd_deployment(SETTINGS, run_root / label, artifacts_root / label, label, plugin_env)
    request.addfinalizer(deployment.teardown)
    STARTED.append(deployment)
    deployment.start()
    return deployment


@pytest.fixture(scope="module")
def ordered_pd(request, run_root, artifacts_root, references):
    """The plugin's deployment (after the reference: they use the same GPUs), shared by the waves below."""
    return start_pd(request, run_root, artifacts_root, "pd-plugin-ordered", fd.PLUGIN_ORDERED)


@pytest.fixture(scope="module")
def race_wave(ordered_pd, payloads):
    """The texts of the race wave (a hang fails every test that needs it, with the full report)."""
    return ordered_pd.run_workload(payloads, SETTINGS.deadline_s)


def test_race_wave_completes_with_the_mixed_outputs_and_equal_rank_sequences(ordered_pd, race_wave, references):
    check_outputs_equal(race_wave, references["race"], SETTINGS.max_mismatches)
    code, report = ordered_pd.diagnose()
    assert code == 0, f"fastdeploy-pd-fix diagnose on the prefill logs: exit code {code}\n{report}"


@pytest.mark.skipif(NO_RACE is not None, reason=NO_RACE or "")
def test_race_happened_on_the_delayed_rank_only(ordered_pd, race_wave):
    counts = early_signal_counts(ordered_pd.server_artifacts("prefill"))
    delayed = SETTINGS.delayed_rank
    report = f"early layer-0 signals per rank: {counts} (FD_E2E_INJECT={SETTINGS.inject}; {RELEASE.reason})"
    assert counts.get(delayed, 0) > 0, f"rank {delayed} saw no layer-0 signal before its registration: {report}"
    others = {rank: count for rank, count in counts.items() if rank != delayed}
    assert others, f"no messager log of any other rank: {report}"
    assert all(count != counts[delayed] for count in others.values()), f"the ranks' arrival orders agree: {report}"


def test_abort_wave_then_a_wave_beyond_max_num_seqs_completes_with_the_mixed_outputs(
    ordered_pd, race_wave, references, refill_payloads, record_property
):
    """Aborts change nothing harmful. On release/2.6 a prefill instance records an abort and ignores it (the request
    computes and transfers to the end): this wave checks that nothing breaks, it cannot exercise abort notices
    there (any in the logs are attached, not asserted on)."""
    closed = ordered_pd.close_streams_early(fd.abort_wave_payloads(SETTINGS), SETTINGS.abort_after_s)
    print(describe_closed_streams(closed))
    record_property("closed_streams", describe_closed_streams(closed))

    texts = ordered_pd.run_workload(refill_payloads, SETTINGS.deadline_s)
    assert len(texts) == SETTINGS.refill_requests
    check_outputs_equal(texts, references["refill"], SETTINGS.max_mismatches)  # the freed slots' next requests
    code, report = ordered_pd.diagnose()

    notices = engine_abort_notices(ordered_pd.server_artifacts("prefill"))
    attached = "\n".join(notices) if notices else "(no engine-side abort notice in the prefill logs)"
    (ordered_pd.artifacts_dir / "engine-abort-notices.txt").write_text(attached + "\n")
    print(f"engine-side abort notices of the prefill server:\n{attached}")
    record_property("engine_abort_notices", attached)
    assert code == 0, f"fastdeploy-pd-fix diagnose after the abort wave: exit code {code}\n{report}"


def test_orphan_wave_direct_requests_to_prefill_beside_routed_ones_are_noticed_dropped_and_answered(
    ordered_pd, race_wave, references, orphan_wave_payloads, record_property
):
    """Requests sent straight to the prefill server (orphans: no ``disaggregate_info``) at the same time as routed
    ones: all are answered with the mixed server's outputs, the engine announced each orphan, every messager rank
    dropped each announced orphan's layer-0 tasks, and the ranks' batch sequences stay equal."""
    if RELEASE.can_race is False:
        pytest.skip(f"the plugin stands aside on a release that cannot race, notices included: {RELEASE.reason}")
    routed, direct = orphan_wave_payloads
    servers = [ordered_pd.entry] * len(routed) + ["prefill"] * len(direct)
    texts = ordered_pd.run_workload(routed + direct, SETTINGS.deadline_s, servers=servers)
    check_outputs_equal(texts, references["orphan"], SETTINGS.max_mismatches)  # the direct ones from index len(routed)

    prefill_logs = ordered_pd.server_artifacts("prefill")
    notices = engine_orphan_notices(prefill_logs)
    attached = "\n".join(notices) if notices else "(no engine-side orphan notice in the prefill logs)"
    (ordered_pd.artifacts_dir / "engine-orphan-notices.txt").write_text(attached + "\n")
    record_property("engine_orphan_notices", attached)
    drops = orphan_drop_counts(prefill_logs)
    record_property("messager_orphan_drops", repr(drops))
    orphans = noticed_orphans(notices)
    print(f"orphan notices of the prefill server:\n{attached}\norphan tasks dropped per rank: {drops}")

    assert len(orphans) >= len(direct), (
        f"{len(direct)} requests were sent straight to the prefill server and answered, but its engine logged orphan "
        f"notices for {len(orphans)} request(s) {orphans} (is the plugin's engine side active on add_request_in_p?):"
        f"\n{attached}"
    )
    assert drops, f"no cache messager log of any prefill rank under {prefill_logs}"
    undropped = {rank: sorted(set(orphans) - set(dropped)) for rank, dropped in sorted(drops.items())}
    undropped = {rank: ids for rank, ids in undropped.items() if ids}
    message = f"messager ranks that dropped no layer-0 task of announced orphans: {undropped} (per rank: {drops})"
    assert not undropped, message
    code, report = ordered_pd.diagnose()
    assert code == 0, f"fastdeploy-pd-fix diagnose after the orphan wave: exit code {code}\n{report}"


@pytest.mark.skipif(not SETTINGS.expect_unfixed, reason="FD_E2E_EXPECT_UNFIXED=1 not set (release has #8034?)")
@pytest.mark.skipif(NO_RACE is not None, reason=f"the A/B run cannot hang: {NO_RACE}")
@pytest.mark.xfail(
    strict=True, raises=RequestsHung, reason="without #8034 or the fix, the prefill cache messager ranks deadlock"
)
def test_pd_without_fix_hangs_on_release_lacking_8034(request, run_root, artifacts_root, payloads):
    label = f"pd-unfixed-{SETTINGS.unfixed_plugin}"
    pd = start_pd(request, run_root, artifacts_root, label, SETTINGS.unfixed_plugin_env)
    pd.run_workload(payloads, SETTINGS.unfixed_deadline_s)
