#!/usr/bin/env bash
# Install Corral with its test extras into .venv (created when missing) and run the whole test suite.
# Extra arguments go to pytest, e.g. `./scripts/test.sh tests/unit -q`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The nginx data plane's Debian packages. Without them (not root, no apt) its tests are skipped and
# the Python gateway is used.
SYSTEM_PACKAGES="nginx-light libnginx-mod-http-lua lua-cjson"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s $SYSTEM_PACKAGES >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYSTEM_PACKAGES >/dev/null
  fi
else
  echo "note: not root or no apt-get; the nginx data plane tests will be skipped" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
