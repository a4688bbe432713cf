#!/usr/bin/env bash
# Everything the test suite needs beyond Python packages: Debian's Chromium (browser tests) and the
# npm schema packages (Kubernetes custom resources). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup-dev: could not install chromium; the browser tests will fail until it is installed" >&2
fi
if [ -f tests/tools/package.json ] && command -v npm >/dev/null 2>&1; then
  (cd tests/tools && npm install --no-audit --no-fund --silent) \
    || echo "setup-dev: npm install failed; custom-resource schema tests will fail" >&2
fi
