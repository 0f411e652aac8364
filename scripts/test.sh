#!/usr/bin/env bash
# Set up (idempotent, see setup.sh) and run every check: ruff, mypy, then the
# whole pytest suite, whose integration tests start real HAProxy 2.6, 2.8, 3.0, 3.2,
# Pebble 2.4 and 2.10 and our agent on 127.0.0.1 by themselves (README: Tested versions).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check agent tests bench scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
