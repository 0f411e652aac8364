#!/usr/bin/env bash
# The local demo on a fresh Debian 12 machine: set up (idempotent), then run
# Pebble + HAProxy + the agent on 127.0.0.1 and show certificates served.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
