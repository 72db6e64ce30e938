"""The GPU e2e harness (tests/e2e) on CPU: start-up, readiness, deadline, teardown and log collection, run against
stub servers (tests/e2e/stubs) on 127.0.0.1 with ports the kernel picks; plus FastDeploy's command lines, the skip
reason and ci/run_gpu_e2e.sh. Handshakes, not sleeps: stubs announce their port in a file, and the late stub
registers only after the router has answered a given number of polls.
"""

import itertools
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from e2e.fastdeploy_servers import (
    DEFAULT_INJECT,
    PLUGIN_ORDERED,
    E2ESettings,
    completion_payload,
    detect_gpus,
    long_prompts,
    mixed_deployment,
    pd_deployment,
    prerequisite_problems,
    probe_fastdeploy,
    probe_release,
    release_features,
    skip_reason,
)
from e2e.orchestration import (
    LOOPBACK,
    Cluster,
    Deployment,
    OutputMismatch,
    PortsBusy,
    ReadinessTimeout,
    RequestsFailed,
    RequestsHung,
    ServerSpec,
    ServerStartError,
    TeardownError,
    WaitForHealth,
    WaitForRegistration,
    busy_ports,
    check_outputs_equal,
    early_signal_counts,
    engine_abort_notices,
    engine_orphan_notices,
    identify,
    is_running,
    noticed_orphans,
    orphan_drop_counts,
    process_group_of,
    registered_number,
    wait_until_ports_free,
)

REPO = Path(__file__).resolve().parents[2]
STUBS = REPO / "tests" / "e2e" / "stubs"
FAST_POLLS = dict(attempts=500, interval_s=0.01)  # a bound, never reached when things work


def stub_spec(work_root: Path, name: str, script: str, *options: str) -> ServerSpec:
    work_dir = work_root / name
    return ServerSpec(
        name=name,
        argv=[sys.executable, str(STUBS / script), "--port-file", str(work_dir / "port"), *options],
        env={**os.environ, "FD_LOG_DIR": str(work_dir / "log")},
        log_path=work_dir / "stdout.log",
        log_dirs=[work_dir / "log"],
        cwd=work_dir,
        port_file=work_dir / "port",
        stop_grace_s=5.0,
    )


def stub_pd(work_root: Path, prefill=(), decode=(), readiness=None) -> Deployment:
    """Stub router, prefill and decode, like pd_deployment: ready when both registered."""
    router_port_file = str(work_root / "router" / "port")
    specs = [
        stub_spec(work_root, "router", "stub_router.py"),
        stub_spec(
            work_root,
            "prefill",
            "stub_server.py",
            "--role",
            "prefill",
            "--router-port-file",
            router_port_file,
            *prefill,
        ),
        stub_spec(
            work_root, "decode", "stub_server.py", "--role", "decode", "--router-port-file", router_port_file, *decode
        ),
    ]
    readiness = readiness or WaitForRegistration({"prefill": 1, "decode": 1}, **FAST_POLLS)
    return Deployment("pd", specs, "router", readiness, work_root / "artifacts", "prefill", port_free_timeout_s=5.0)


def stub_mixed(work_root: Path, *options: str) -> Deployment:
    specs = [stub_spec(work_root, "mixed", "stub_server.py", "--role", "mixed", *options)]
    return Deployment(
        "mixed", specs, "mixed", WaitForHealth(**FAST_POLLS), work_root / "artifacts", port_free_timeout_s=5.0
    )


@pytest.fixture
def deploy(request):
    """Registers each deployment's teardown as a finalizer before it starts, as the GPU test does."""

    def register(deployment: Deployment) -> Deployment:
        request.addfinalizer(deployment.teardown)
        return deployment

    return register


def stop_and_check(deployment: Deployment) -> None:
    """Teardown, then: every server process exited and every port is free."""
    servers, ports = list(deployment.cluster.servers), deployment.cluster.ports()
    assert ports, "the stubs announced no port"
    deployment.teardown()
    assert [server.name for server in servers if server.exit_code() is None] == []
    assert busy_ports(ports) == []


# --- orchestration against the stubs ---------------------------------------------------------------------------


def test_pd_answers_through_the_router_equal_the_mixed_reference_and_teardown_frees_everything(tmp_path, deploy):
    pd = deploy(stub_pd(tmp_path / "pd", prefill=["--cache-messager-logs", "agree"]))
    mixed = deploy(stub_mixed(tmp_path / "mixed"))
    pd.start()
    mixed.start()
    payloads = [completion_payload(prompt, max_tokens=8) for prompt in long_prompts(6)]

    texts = pd.run_workload(payloads, deadline_s=20.0)
    check_outputs_equal(texts, mixed.run_workload(payloads, deadline_s=20.0))
    assert len(set(texts)) == len(payloads)
    chat = {"model": "default", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    assert pd.run_workload([chat], deadline_s=20.0, path="/v1/chat/completions")[0].startswith("stub answer")
    code, report = pd.diagnose()
    assert code == 0, report

    stop_and_check(pd)
    stop_and_check(mixed)
    assert (pd.artifacts_dir / "prefill" / "log" / "cache_messager_rank1.log").is_file()
    assert (pd.artifacts_dir / "router" / "stdout.log").is_file()


def test_requests_straight_to_the_prefill_stub_beside_routed_ones_are_its_orphans(tmp_path, deploy):
    """The router stub marks what it forwards (``disaggregate_info``), so only the requests sent straight to the
    prefill stub are orphans: one engine notice each, and every stub messager rank drops their chunks."""
    pd = deploy(stub_pd(tmp_path / "pd", prefill=["--cache-messager-logs", "agree", "--orphan-notices"]))
    mixed = deploy(stub_mixed(tmp_path / "mixed"))
    pd.start()
    mixed.start()
    payloads = [completion_payload(prompt, max_tokens=8) for prompt in long_prompts(5)]
    servers = ["router", "prefill", "router", "router", "prefill"]

    texts = pd.run_workload(payloads, deadline_s=20.0, servers=servers)
    check_outputs_equal(texts, mixed.run_workload(payloads, deadline_s=20.0))
    logs = pd.server_artifacts("prefill")
    notices = engine_orphan_notices(logs)
    orphans = noticed_orphans(notices)
    assert len(notices) == len(orphans) == 2, notices
    assert all(notice.startswith("log/engine.log: ") for notice in notices)
    drops = orphan_drop_counts(logs)
    assert sorted(drops) == [0, 1] and all(sorted(dropped) == sorted(orphans) for dropped in drops.values()), drops
    assert min(count for dropped in drops.values() for count in dropped.values()) > 1  # one per chunk
    code, report = pd.diagnose()
    assert code == 0, report
    stop_and_check(pd)
    stop_and_check(mixed)


def test_a_late_registration_is_waited_for(tmp_path, deploy):
    pd = deploy(stub_pd(tmp_path, decode=["--register-after-router-polls", "3"]))
    pd.start()
    assert pd.readiness_polls > 3  # the first three polls were answered before decode could register
    assert registered_number(pd.base_url) == {"mixed": 0, "prefill": 1, "decode": 1}
    stop_and_check(pd)


def test_a_registration_that_never_comes_fails_after_the_bounded_polls(tmp_path, deploy):
    readiness = WaitForRegistration({"prefill": 1, "decode": 1}, attempts=5, interval_s=0.01)
    pd = deploy(stub_pd(tmp_path, decode=["--never-register"], readiness=readiness))
    with pytest.raises(ReadinessTimeout, match="after 5 polls") as failure:
        pd.start()
    assert "'decode': 0" in str(failure.value)
    assert "stdout.log" in str(failure.value)  # the servers' log tails are attached
    stop_and_check(pd)


def test_a_server_dying_at_start_up_is_reported_with_its_log(tmp_path, deploy):
    pd = deploy(stub_pd(tmp_path, decode=["--exit-code", "3"]))
    with pytest.raises(ServerStartError, match="decode exited with code 3") as failure:
        pd.start()
    assert "failing start-up on purpose" in str(failure.value)
    stop_and_check(pd)


def test_a_server_that_never_answers_is_a_hang_reported_with_the_rank_logs_and_diagnose(tmp_path, deploy):
    pd = deploy(stub_pd(tmp_path, prefill=["--cache-messager-logs", "diverge"], decode=["--never-answer"]))
    pd.start()
    payloads = [completion_payload(prompt, max_tokens=8) for prompt in long_prompts(4)]

    started = time.monotonic()
    with pytest.raises(RequestsHung) as failure:
        pd.run_workload(payloads, deadline_s=1.0, servers=["router", "router", "router", "prefill"])
    assert time.monotonic() - started < 15.0
    message = str(failure.value)
    assert "3 of 4 requests did not complete within 1.0 s" in message
    assert f"request 3 to {pd.server_url('prefill')}/v1/completions: ok" in message  # straight to prefill: answered
    assert f"request 0 to {pd.base_url}/v1/completions: no answer" in message
    assert "diagnose" in message and "exit code 1" in message  # the stub ranks' batch sequences diverge
    assert "queued batch #2 [(1, 64)]" in message  # rank 1's cache messager log is attached
    assert (pd.artifacts_dir / "prefill" / "log" / "cache_messager_rank0.log").is_file()
    stop_and_check(pd)  # request threads still wait on the stubs: the teardown must not


def test_a_request_answered_with_an_error_fails_the_workload(tmp_path, deploy):
    readiness = WaitForRegistration({"prefill": 1}, **FAST_POLLS)
    pd = deploy(stub_pd(tmp_path, decode=["--never-register"], readiness=readiness))
    pd.start()
    with pytest.raises(RequestsFailed, match="HTTP 503"):
        pd.run_workload([completion_payload("hello", 4)], deadline_s=20.0)
    stop_and_check(pd)


def test_teardown_reaches_a_child_that_started_a_session_of_its_own(tmp_path, deploy):
    child_file = tmp_path / "child"
    mixed = deploy(stub_mixed(tmp_path, "--detached-child-file", str(child_file)))
    mixed.start()
    server = mixed.cluster.server("mixed")
    pid, port = (int(field) for field in server.wait_for_file(child_file, 10.0).split())
    child = identify(pid)
    assert child is not None and process_group_of(child) != server.pid  # out of reach of killpg alone
    assert busy_ports([port]) == [port]

    stop_and_check(mixed)
    assert not is_running(child)
    assert wait_until_ports_free([port], LOOPBACK, 5.0) == []


@pytest.fixture
def held_port():
    """A port held by a listening socket of this test process."""
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_port_is_refused_before_anything_starts(tmp_path, held_port):
    spec = stub_spec(tmp_path, "mixed", "stub_server.py")
    spec.ports.append(held_port)
    cluster = Cluster("busy")
    with pytest.raises(PortsBusy, match=str(held_port)) as refusal:
        cluster.start(spec)
    assert cluster.servers == []
    assert f"{held_port}: LISTEN in pid {os.getpid()} (" in str(refusal.value)  # the message names the holder


def test_a_port_still_held_after_the_teardown_is_reported_with_its_holder(tmp_path, held_port):
    spec = stub_spec(tmp_path, "mixed", "stub_server.py")
    cluster = Cluster("held", port_free_timeout_s=0.1)
    cluster.start(spec)
    spec.ports.append(held_port)  # as if the server had left it behind
    holder = rf"{held_port}: LISTEN in pid {os.getpid()} \("
    with pytest.raises(TeardownError, match=rf"\[{held_port}\] still in use .*{holder}"):
        cluster.teardown()


def test_output_mismatches_are_reported_with_both_texts():
    with pytest.raises(OutputMismatch, match="1 of 2 outputs differ") as failure:
        check_outputs_equal(["same", "left"], ["same", "right"])
    assert "'left'" in str(failure.value) and "'right'" in str(failure.value)
    check_outputs_equal(["same", "left"], ["same", "right"], max_mismatches=1)


# --- FastDeploy command lines, prerequisites, CI script --------------------------------------------------------


def free_port_blocks(count: int, size: int) -> List[int]:
    """The first ports of ``count`` disjoint blocks of ``size`` ports, all free now and all below the kernel's
    ephemeral range: a port inside that range may be taken at any moment as the local port of an outgoing connection
    (the dry runs make many), and then stays busy for as long as that connection lives."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(10000, low - size, size))
    random.shuffle(candidates)
    bases = list(itertools.islice((base for base in candidates if not busy_ports(range(base, base + size))), count))
    assert len(bases) == count, f"not {count} blocks of {size} free ports in 10000..{low}"
    return bases


def dry_run_environment(tmp_path: Path, gpus: int, with_7724: str, port_base: int) -> dict:
    """A fake nvidia-smi listing ``gpus`` GPUs and a fake FastDeploy whose router and api_server are the stubs on
    FastDeploy's ports, and whose cache messager (for ``fastdeploy-pd-fix status``) is the stand-in's."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    listing = " ".join(str(index) for index in range(gpus))
    (fake_bin / "nvidia-smi").write_text(
        f'#!/bin/sh\nfor i in {listing}; do echo "GPU $i: Fake (UUID: GPU-$i)"; done\n'
    )
    (fake_bin / "nvidia-smi").chmod(0o755)
    (tmp_path / "model").mkdir()
    return {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(STUBS / "fake_fastdeploy"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "FD_STANDIN_7724": with_7724,
        "FD_E2E_MODEL": str(tmp_path / "model"),
        "FD_E2E_PORT_BASE": str(port_base),
        "FD_E2E_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "FD_E2E_REQUESTS": "4",
        "FD_E2E_MAX_NUM_SEQS": "2",
        "FD_E2E_ABORTED_REQUESTS": "3",
        "FD_E2E_ABORT_AFTER_S": "10",  # the stubs answer a stream at once: the close never waits for this
        "FD_E2E_ORPHAN_REQUESTS": "2",  # beside max-num-seqs (2) routed ones
        "FD_E2E_READY_ATTEMPTS": "6000",  # detection only: a loaded machine starts the stubs slowly
        "FD_E2E_READY_INTERVAL_S": "0.01",
        "FD_E2E_STOP_GRACE_S": "5",
        "FD_E2E_PORT_FREE_TIMEOUT_S": "5",
        "FD_E2E_DEADLINE_S": "60",
        "FD_E2E_UNFIXED_DEADLINE_S": "1",
        "FD_E2E_EXPECT_UNFIXED": "1",
        "FD_E2E_REQUIRED": "1",
    }


#: The dry runs of the GPU module: (name, fake GPUs, FD_STANDIN_7724, extra environment).
DRY_RUNS = [
    ("4-gpus-7724", 4, "1", {}),
    ("2-gpus-pre-7724", 2, "0", {}),
    ("1-gpu", 1, "1", {"FD_E2E_REQUIRED": "0"}),
    # The fake prefill server logs no orphan notice and no drop (as if the plugin's engine side were not active),
    # or the notices without the messagers' drops: the orphan wave must fail.
    ("orphans-unannounced", 4, "1", {"FD_E2E_FAKE_ORPHANS": "unannounced"}),
    ("orphans-undropped", 4, "1", {"FD_E2E_FAKE_ORPHANS": "undropped"}),
]
ORPHAN_WAVE_TEST = (
    "tests/e2e/test_pd_e2e.py::"
    "test_orphan_wave_direct_requests_to_prefill_beside_routed_ones_are_noticed_dropped_and_answered"
)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Every dry run of tests/e2e at once (each mostly waits: paddle's import for status, the stubs), then their
    results by name: (tmp_path, completed process with stdout and stderr)."""
    started = {}
    port_bases = free_port_blocks(len(DRY_RUNS), 40)
    for (name, gpus, with_7724, extra), port_base in zip(DRY_RUNS, port_bases):
        tmp_path = tmp_path_factory.mktemp(name)
        environ = {**dry_run_environment(tmp_path, gpus, with_7724, port_base), **extra}
        command = [sys.executable, "-m", "pytest", "tests/e2e", "-p", "no:cacheprovider", "-q", "-rA"]
        output = open(tmp_path / "pytest-output.txt", "w+")
        process = subprocess.Popen(command, cwd=REPO, env=environ, stdout=output, stderr=subprocess.STDOUT, text=True)
        started[name] = (tmp_path, process, output)
    results = {}
    for name, (tmp_path, process, output) in started.items():
        try:
            process.wait(timeout=480)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output.seek(0)
        results[name] = (tmp_path, subprocess.CompletedProcess(process.args, process.returncode, output.read(), ""))
        output.close()
    return results


def test_gpu_module_dry_run_with_4_gpus_and_a_release_with_7724(dry_runs):
    """tests/e2e/test_pd_e2e.py itself, unchanged: fixtures, readiness, the race wave, the race proof (rank 1's early
    layer-0 signals in the stub's logs), the abort wave, the orphan wave (two requests straight to the prefill stub
    beside two routed ones: two notices, every rank dropped both), diagnose, the strict xfail (the fake decode server
    never answers while the fix is off) and the teardowns all run; each server has its own two GPUs."""
    tmp_path, result = dry_runs["4-gpus-7724"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed, 1 xfailed" in result.stdout, result.stdout
    artifacts = tmp_path / "artifacts"
    prefill_log = (artifacts / "pd-plugin-ordered" / "prefill" / "stdout.log").read_text()
    decode_log = (artifacts / "pd-plugin-ordered" / "decode" / "stdout.log").read_text()
    assert f"FD_PD_FIX_INJECT={DEFAULT_INJECT}" in prefill_log and "FD_PD_FIX_MODE=ordered" in prefill_log
    assert "--splitwise-role prefill" in prefill_log and "--tensor-parallel-size 2" in prefill_log
    assert "CUDA_VISIBLE_DEVICES=0,1" in prefill_log and "CUDA_VISIBLE_DEVICES=2,3" in decode_log
    assert "--gpu-memory-utilization" not in prefill_log + decode_log
    for switch in ("ENABLE_V1_KVCACHE_MANAGER=0", "FD_ENABLE_REQUEST_DISCONNECT_STOP_INFERENCE=1"):
        assert switch in prefill_log and switch in decode_log
    assert "FD_DETERMINISTIC_MODE=1" in prefill_log and "NO_PROXY=" in prefill_log
    assert "FD_PD_FIX_MODE=observe" in (artifacts / "pd-unfixed-observe" / "decode" / "stdout.log").read_text()
    assert (artifacts / "pd-unfixed-observe" / "prefill" / "log" / "cache_messager_rank1.log").is_file()
    assert (artifacts / "mixed-reference" / "mixed" / "stdout.log").is_file()
    assert (artifacts / "pd-plugin-ordered" / "engine-abort-notices.txt").is_file()
    assert "3 streams closed: 3 after the server answered" in result.stdout
    notices = (artifacts / "pd-plugin-ordered" / "engine-orphan-notices.txt").read_text().splitlines()
    assert len(notices) == 2 and len(noticed_orphans(notices)) == 2, notices  # the routed ones are no orphans
    assert all(notice.startswith("log/engine.log: ") for notice in notices), notices
    drops = orphan_drop_counts(artifacts / "pd-plugin-ordered" / "prefill")
    assert {rank: sorted(dropped) for rank, dropped in drops.items()} == dict.fromkeys(
        [0, 1], sorted(noticed_orphans(notices))
    )


@pytest.mark.parametrize(
    "name, complaint",
    [
        ("orphans-unannounced", "its engine logged orphan notices for 0 request(s) []"),
        ("orphans-undropped", "messager ranks that dropped no layer-0 task of announced orphans: {0: ["),
    ],
)
def test_gpu_module_dry_run_fails_the_orphan_wave_without_notices_or_drops(dry_runs, name, complaint):
    """The orphan wave's checks can fail: without the engine's orphan notices (or with them but without the
    messagers' drops) it fails with that reason, and only it."""
    tmp_path, result = dry_runs[name]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 3 passed, 1 xfailed" in result.stdout, result.stdout
    assert f"FAILED {ORPHAN_WAVE_TEST}" in result.stdout, result.stdout
    assert complaint in result.stdout, result.stdout
    assert (tmp_path / "artifacts" / "pd-plugin-ordered" / "engine-orphan-notices.txt").is_file()


def test_gpu_module_dry_run_with_2_shared_gpus_and_a_release_before_7724(dry_runs):
    """Prefill and decode share GPUs 0,1 with a lowered --gpu-memory-utilization; the release cannot race, so the
    race proof, the A/B run and the orphan wave (the plugin stands aside there) skip with that reason while the
    other waves still run."""
    tmp_path, result = dry_runs["2-gpus-pre-7724"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 3 skipped" in result.stdout, result.stdout
    assert result.stdout.count("predates #7724") == 3, result.stdout  # the race proof's, the A/B run's, the orphans'
    artifacts = tmp_path / "artifacts" / "pd-plugin-ordered"
    for role in ("prefill", "decode"):
        log = (artifacts / role / "stdout.log").read_text()
        assert "CUDA_VISIBLE_DEVICES=0,1" in log and "--gpu-memory-utilization 0.4" in log


def test_gpu_module_with_too_few_gpus_skips_with_the_reason(dry_runs):
    _, result = dry_runs["1-gpu"]
    assert result.returncode == 5, result.stdout + result.stderr  # no test ran: the module skipped itself
    assert "1 GPU(s), the configured GPU ids need 2" in result.stdout, result.stdout


def option(spec: ServerSpec, name: str) -> str:
    return spec.argv[spec.argv.index(name) + 1]


def test_fastdeploy_pd_command_lines_over_ipc(tmp_path):
    settings = E2ESettings.from_env({"FD_E2E_MODEL": "/models/ernie", "FD_E2E_PORT_BASE": "9000"}, gpu_count=4)
    inherited = {"PATH": "/usr/bin", "FD_PD_FIX": "0", "FD_PD_FIX_INJECT": "signal:rank=0:delay_ms=1"}
    router, prefill, decode = pd_deployment(
        settings, tmp_path, tmp_path / "out", "pd", PLUGIN_ORDERED, inherited
    ).specs

    assert router.argv[1:] == ["-m", "fastdeploy.router.launch", "--port", "9000", "--splitwise"]
    assert prefill.argv[1:3] == ["-m", "fastdeploy.entrypoints.openai.api_server"]
    assert option(prefill, "--model") == "/models/ernie"
    assert [option(prefill, "--tensor-parallel-size"), option(decode, "--tensor-parallel-size")] == ["2", "2"]
    assert [option(prefill, "--splitwise-role"), option(decode, "--splitwise-role")] == ["prefill", "decode"]
    assert option(prefill, "--cache-transfer-protocol") == "ipc" and "--rdma-comm-ports" not in prefill.argv
    assert option(decode, "--router") == "127.0.0.1:9000"
    assert option(prefill, "--max-num-batched-tokens") == "256"
    assert [prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]] == ["0,1", "2,3"]
    assert {spec.env["ENABLE_V1_KVCACHE_SCHEDULER"] for spec in (prefill, decode)} == {"1"}
    assert len({spec.env["FD_LOG_DIR"] for spec in (router, prefill, decode)}) == 3
    assert prefill.env["FD_PD_FIX_INJECT"] == DEFAULT_INJECT and "FD_PD_FIX_INJECT" not in decode.env
    assert settings.delayed_rank == 1 and settings.shared_gpus == ()
    for spec in (prefill, decode):
        assert spec.env["ENABLE_V1_KVCACHE_MANAGER"] == "0" and spec.env["FD_DETERMINISTIC_MODE"] == "1"
        assert spec.env["FD_ENABLE_REQUEST_DISCONNECT_STOP_INFERENCE"] == "1"
        assert "--gpu-memory-utilization" not in spec.argv  # own GPUs: FastDeploy's default
    for spec in (router, prefill, decode):
        assert spec.env["NO_PROXY"] == spec.env["no_proxy"] == "127.0.0.1,localhost,::1"
    assert (prefill.env["FD_PD_FIX"], prefill.env["FD_PD_FIX_MODE"]) == ("1", "ordered")
    ports = [port for spec in (router, prefill, decode) for port in spec.ports]
    assert len(ports) == len(set(ports)) and prefill.ports[0] == int(option(prefill, "--port"))


def test_fastdeploy_command_lines_over_rdma_and_the_mixed_reference(tmp_path):
    environ = {"FD_E2E_MODEL": "/m", "KVCACHE_RDMA_NICS": "mlx5_0", "FD_E2E_EXTRA_SERVER_ARGS": "--quantization wint8"}
    settings = E2ESettings.from_env(environ, gpu_count=2)
    _, prefill, decode = pd_deployment(settings, tmp_path, tmp_path / "out", "pd", PLUGIN_ORDERED, environ).specs
    assert option(prefill, "--cache-transfer-protocol") == "rdma"
    assert option(prefill, "--rdma-comm-ports") == "8715,8716" and option(decode, "--rdma-comm-ports") == "8725"
    assert decode.env["CUDA_VISIBLE_DEVICES"] == "1"  # one decode GPU, shared with prefill on a 2-GPU machine
    assert prefill.env["KVCACHE_RDMA_NICS"] == "mlx5_0" and prefill.argv[-2:] == ["--quantization", "wint8"]

    (mixed,) = mixed_deployment(settings, tmp_path, tmp_path / "out", environ).specs
    assert "--splitwise-role" not in mixed.argv and "--router" not in mixed.argv
    assert settings.unfixed_plugin_env == {"FD_PD_FIX": "1", "FD_PD_FIX_MODE": "observe"}


def test_prefill_and_decode_sharing_two_gpus_get_a_lowered_memory_share(tmp_path):
    environ = {"FD_E2E_MODEL": "/m", "NO_PROXY": "proxy.example,localhost", "FD_E2E_DETERMINISTIC": "0"}
    settings = E2ESettings.from_env(environ, gpu_count=2)
    router, prefill, decode = pd_deployment(settings, tmp_path, tmp_path / "out", "pd", PLUGIN_ORDERED, environ).specs
    assert settings.shared_gpus == (0, 1)
    for spec in (prefill, decode):
        assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1" and option(spec, "--gpu-memory-utilization") == "0.4"
        assert spec.env["FD_DETERMINISTIC_MODE"] == "0"
    assert router.env["NO_PROXY"] == "proxy.example,localhost,127.0.0.1,::1"
    (mixed,) = mixed_deployment(settings, tmp_path, tmp_path / "out", environ).specs
    assert "--gpu-memory-utilization" not in mixed.argv  # alone on its GPUs

    chosen = E2ESettings.from_env({**environ, "FD_E2E_EXTRA_SERVER_ARGS": "--gpu-memory-utilization 0.3"}, gpu_count=2)
    _, prefill, _ = pd_deployment(chosen, tmp_path, tmp_path / "out", "pd", PLUGIN_ORDERED, environ).specs
    assert prefill.argv.count("--gpu-memory-utilization") == 1 and option(prefill, "--gpu-memory-utilization") == "0.3"


STATUS_WITH_7724 = """fastdeploy-pd-fix 0.1.0
FastDeploy:  2.6.1 (/site-packages/fastdeploy/cache_manager/cache_messager.py)
target:      CacheMessagerV1 recognised; get_output_kv_signal(buf, self.rank_id, 0); pending_layer0_signals (#7872+); \
no finish_add_cache_task_barrier (#7724+); send loop waits for registration (#7724+)
"""
STATUS_PRE_7724 = """FastDeploy:  2.5.0 (/site-packages/fastdeploy/cache_manager/cache_messager.py)
target:      CacheMessagerV1 recognised; get_output_kv_signal(buf, self.rank_id, 0); no pending buffer (pre-#7872); \
finish_add_cache_task_barrier (pre-#7724); send loop does not wait for registration
"""
STATUS_NO_TARGET = """FastDeploy:  unknown; fastdeploy.cache_manager.cache_messager not importable: ImportError('libcuda')
"""


def test_the_release_features_come_from_the_status_feature_line():
    assert release_features(STATUS_WITH_7724).can_race is True
    before = release_features(STATUS_PRE_7724)
    assert before.can_race is False and "predates #7724" in before.reason and "2.5.0" in before.reason
    unknown = release_features(STATUS_NO_TARGET)
    assert unknown.can_race is None and "libcuda" in unknown.reason
    ran = subprocess.CompletedProcess([], 0, STATUS_PRE_7724, "")
    assert probe_release(sys.executable, run=lambda *a, **k: ran).can_race is False
    failed = subprocess.CompletedProcess([], 1, "", "No module named fastdeploy_pd_fix")
    assert "No module named fastdeploy_pd_fix" in probe_release(sys.executable, run=lambda *a, **k: failed).reason


def test_early_signal_counts_per_rank_and_engine_abort_notices(tmp_path):
    log = tmp_path / "prefill" / "log"
    log.mkdir(parents=True)
    early = "INFO fastdeploy_pd_fix: early layer-0 signal #{}: slot 3 chunk [0, 256) arrived before its registration"
    (log / "cache_messager_rank0.log").write_text("patched ...; active on rank_id=0 rank=0 nranks=2\n")
    (log / "cache_messager_rank1.log").write_text("\n".join(early.format(n) for n in (1, 2, 3)) + "\n")
    (log / "launch_cache_messager_1.log").write_text(early.format(7) + "\n")  # not a rank log: its stderr
    (log / "cache_messager_device3.log").write_text("active on rank_id=2 rank=0 nranks=2\n" + early.format(4) + "\n")
    assert early_signal_counts(tmp_path) == {0: 4, 1: 3}  # rank 0 of a second DP group logged 4: the highest counts

    notice = "INFO fastdeploy_pd_fix: abort of request req-7 in slot 2 sent, emitted_end=512"
    (log / "engine.log").write_text(f"something else\n{notice}\n")
    (log / "cache_messager_rank0.log").write_text(f"{notice}\n")  # the messager's own log: not the engine's
    assert engine_abort_notices(tmp_path) == [f"prefill/log/engine.log: {notice}"]


def test_engine_orphan_notices_and_the_orphan_tasks_each_rank_dropped(tmp_path):
    log = tmp_path / "prefill" / "log"
    log.mkdir(parents=True)
    notice = "fastdeploy_pd_fix: engine notice put: orphan of request {} on slot {} (need_prefill_tokens=700)"
    abort = "fastdeploy_pd_fix: engine notice put: abort of request r-9 on slot 1 (emitted_end=256), fenced"
    engine_lines = [notice.format("o-1", 3), abort, notice.format("o-2", 4), notice.format("o-1", 3)]
    (log / "workerlog.0").write_text("\n".join(engine_lines) + "\n")
    drop = (
        "fastdeploy_pd_fix: dropped layer-0 task slot=3 prefilled_token_num={end} from {source}: "
        "chunk [{start}, {end}) belongs to orphan {request_id}"
    )
    other = "fastdeploy_pd_fix: dropped layer-0 task slot=3 prefilled_token_num=256 from kv signal: chunk [0, 256) "
    (log / "cache_messager_rank0.log").write_text(
        "\n".join(
            [
                "active on rank_id=0 rank=0 nranks=2",
                drop.format(start=0, end=256, source="kv signal", request_id="o-1"),
                drop.format(start=256, end=512, source="notice", request_id="o-1"),
                drop.format(start=0, end=256, source="registration", request_id="o-2"),
                other + "does not fit request r-5, which needs 128 tokens",
                notice.format("o-3", 5),  # an engine line in a messager log is not a notice
            ]
        )
        + "\n"
    )
    (log / "cache_messager_rank1.log").write_text(drop.format(start=0, end=256, source="kv signal", request_id="o-2"))

    notices = engine_orphan_notices(tmp_path)
    assert notices == [f"prefill/log/workerlog.0: {line}" for line in engine_lines if "orphan" in line]
    assert noticed_orphans(notices) == ["o-1", "o-2"]
    assert orphan_drop_counts(tmp_path) == {0: {"o-1": 2, "o-2": 1}, 1: {"o-2": 1}}
    (log / "cache_messager_rank1.log").write_text("active on rank_id=1 rank=1 nranks=2\n")
    assert orphan_drop_counts(tmp_path)[1] == {}  # a rank that dropped nothing is still listed


@pytest.mark.parametrize(
    "environ, complaint",
    [
        ({"FD_E2E_REFILL_REQUESTS": "16"}, "must exceed --max-num-seqs 16"),
        ({"FD_E2E_SHARED_GPU_MEMORY_UTILIZATION": "0.6"}, "each needs a share in"),
        ({"FD_E2E_PREFILL_GPUS": "0"}, "TP size of 2"),
        ({"FD_E2E_DECODE_GPUS": "2"}, "IPC transfer needs equal TP sizes"),
        ({"FD_E2E_REQUESTS": "many"}, "FD_E2E_REQUESTS='many'"),
        ({"FD_E2E_ORPHAN_REQUESTS": "0"}, "FD_E2E_ORPHAN_REQUESTS=0: must be positive"),
        ({"FD_E2E_ORPHAN_ROUTED_REQUESTS": "12"}, "together they must exceed --max-num-seqs 16"),
        ({"FD_E2E_UNFIXED_PLUGIN": "maybe"}, "FD_E2E_UNFIXED_PLUGIN"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(environ, complaint):
    with pytest.raises(ValueError, match=complaint):
        E2ESettings.from_env(environ, gpu_count=4)


def test_the_skip_reason_names_every_missing_prerequisite(tmp_path):
    settings = E2ESettings.from_env({}, gpu_count=0)
    no_module = "import fastdeploy failed: ModuleNotFoundError: No module named 'fastdeploy'"
    reason = skip_reason(prerequisite_problems(settings, 0, "nvidia-smi not found", no_module))
    assert "nvidia-smi not found" in reason and "No module named 'fastdeploy'" in reason and "FD_E2E_MODEL" in reason

    ready = E2ESettings.from_env({"MODEL_PATH": str(tmp_path)}, gpu_count=4)
    (tmp_path / "ERNIE-4.5-0.3B-Paddle").mkdir()
    assert prerequisite_problems(ready, 4, None, None) == []
    assert prerequisite_problems(ready, 1, None, None) == [
        "1 GPU(s), the configured GPU ids need 4 (prefill [0, 1]: the race needs TP 2 or more; decode [2, 3])"
    ]


def test_gpu_and_fastdeploy_probes():
    assert detect_gpus(which=lambda name: None) == (0, "nvidia-smi not found")
    listing = subprocess.CompletedProcess([], 0, "GPU 0: A100 (UUID: a)\nGPU 1: A100 (UUID: b)\n", "")
    assert detect_gpus(which=lambda name: "/usr/bin/nvidia-smi", run=lambda *a, **k: listing) == (2, None)

    standin = subprocess.CompletedProcess([], 0, "True 2.6.0.standin\n", "")
    assert "stand-in" in probe_fastdeploy(sys.executable, run=lambda *a, **k: standin)
    real = subprocess.CompletedProcess([], 0, "False 2.5.0\n", "")
    assert probe_fastdeploy(sys.executable, run=lambda *a, **k: real) is None
    missing = subprocess.CompletedProcess(
        [], 1, "", "Traceback ...\nModuleNotFoundError: No module named 'fastdeploy'\n"
    )
    assert probe_fastdeploy(sys.executable, run=lambda *a, **k: missing).endswith("No module named 'fastdeploy'")


@pytest.mark.parametrize("required, expected_exit", [("0", 0), ("1", 2)])
def test_run_gpu_e2e_script_runs_the_module_and_collects_its_output(tmp_path, required, expected_exit):
    artifacts = tmp_path / "artifacts"
    environ = {
        **os.environ,
        "PYTHON": sys.executable,
        "FD_E2E_ARTIFACTS_DIR": str(artifacts),
        "FD_E2E_REQUIRED": required,
        "FD_E2E_MODEL": str(tmp_path / "no-such-model"),  # never a real GPU run from here, even on a GPU machine
    }
    result = subprocess.run(
        ["bash", str(REPO / "ci" / "run_gpu_e2e.sh")], env=environ, capture_output=True, text=True, timeout=120
    )
    pytest_log = (artifacts / "pytest.log").read_text()
    assert result.returncode == expected_exit, result.stdout + result.stderr
    assert f"no model at {tmp_path / 'no-such-model'}" in pytest_log
    assert ("1 skipped" in pytest_log) == (required == "0")
    assert (artifacts / "environment.txt").is_file() and (artifacts / "junit.xml").is_file()
