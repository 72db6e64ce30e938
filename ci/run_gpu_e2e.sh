#!/usr/bin/env bash
# Run the GPU end-to-end PD test (tests/e2e) and gather everything a failure needs into one directory.
#
#   bash ci/run_gpu_e2e.sh [extra pytest arguments]
#
# Environment, all optional: PYTHON (the interpreter with FastDeploy and the plugin; default python3),
# FD_E2E_ARTIFACTS_DIR (default build/e2e-artifacts, git-ignored), FD_E2E_REQUIRED (default 1: missing GPUs,
# FastDeploy or model fail the run instead of skipping it), FD_E2E_MODEL or MODEL_PATH, and the FD_E2E_* settings
# described in tests/e2e/fastdeploy_servers.py.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python_bin=${PYTHON:-python3}
artifacts_dir=${FD_E2E_ARTIFACTS_DIR:-$repo_root/build/e2e-artifacts}
mkdir -p "$artifacts_dir"
artifacts_dir=$(cd "$artifacts_dir" && pwd)
export FD_E2E_ARTIFACTS_DIR=$artifacts_dir
export FD_E2E_REQUIRED=${FD_E2E_REQUIRED:-1}

# What ran where, recorded first, so that even a run that fails to start leaves a trace.
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "python: $(command -v "$python_bin") ($("$python_bin" --version 2>&1))"
    env | grep -E '^(FD_E2E_|FD_PD_FIX|FD_DETERMINISTIC_MODE=|ENABLE_V1_|MODEL_PATH=|KVCACHE_RDMA_NICS=|CUDA_VISIBLE_DEVICES=)' |
        sort || true
} >"$artifacts_dir/environment.txt" 2>&1
nvidia-smi >"$artifacts_dir/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" >>"$artifacts_dir/nvidia-smi.txt"
"$python_bin" -m pip list >"$artifacts_dir/pip-list.txt" 2>&1 || true
# The test reads the same report: its feature line says whether the release can race at all (#7724).
"$python_bin" -m fastdeploy_pd_fix status >"$artifacts_dir/plugin-status.txt" 2>&1 || true

cd "$repo_root"
status=0
"$python_bin" -m pytest tests/e2e -v -rA -p no:cacheprovider --junitxml "$artifacts_dir/junit.xml" "$@" 2>&1 |
    tee "$artifacts_dir/pytest.log" || status=$?
if [ "$status" -eq 5 ] && [ "$FD_E2E_REQUIRED" != 1 ]; then
    # pytest's "no tests ran": the module skipped itself (reason above) and FD_E2E_REQUIRED=0 allows that.
    status=0
fi
echo "e2e logs and reports: $artifacts_dir"
exit "$status"
