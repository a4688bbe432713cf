#!/usr/bin/env bash
# Set up everything and run the whole test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-dev.sh
export PYTHONDONTWRITEBYTECODE=1
set +e
# Style is checked, not hoped for: ruff's rules and line length are in pyproject.toml.
.venv/bin/ruff check .
lint=$?
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a broken suite, not a pass, but keep it distinct.
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
if [ "$lint" -ne 0 ]; then
  echo "test.sh: ruff found problems (listed before the tests)" >&2
  [ "$rc" -eq 0 ] && rc=1
fi
exit "$rc"
