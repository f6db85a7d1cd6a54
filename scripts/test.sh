#!/usr/bin/env bash
# Install Corral with its test extras into .venv (created when missing) and run the whole test suite.
# Extra arguments go to pytest, e.g. `./scripts/test.sh tests/unit -q`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the nginx data plane's (without them its tests are skipped and the Python gateway
# is used) and chromium for the browser tests of the UI (Playwright drives it; no browser download).
SYSTEM_PACKAGES="nginx-light libnginx-mod-http-lua lua-cjson chromium"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s $SYSTEM_PACKAGES >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYSTEM_PACKAGES >/dev/null
  fi
else
  echo "note: not root or no apt-get; the nginx data plane and browser tests may be skipped" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
