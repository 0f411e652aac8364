"""Shared pieces of the chaos suite: the budget, the agent as a subprocess, the invariants.

The invariants look only at public surfaces, never inside the state dir
(whose layout is the agent's business): the bundles in `cert_dir`, the
crt-list file and `haproxy -c` on the real binary, the stable key files,
`haproxy-acme-agent status --json`, `show ssl cert` over the runtime API and
real TLS handshakes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from tests.support.acme_stack import AcmeStack, toml_value
from tests.support.tls import served_leaf

REPO = Path(__file__).resolve().parents[2]

AGENT_TIMEOUT = 180.0  # s: any single agent command; far above what one takes on a busy box
SYNC_TIMEOUT = 90.0  # s: a running daemon must bring HAProxy in sync within this


def env_int(name: str, default: int) -> int:
    """A budget knob from the environment (CI keeps the defaults)."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def rounds() -> int:
    """CHAOS_ROUNDS: rounds (kills, fault runs) per scenario; default 3."""
    return max(1, env_int("CHAOS_ROUNDS", 3))


def seed() -> int:
    """CHAOS_SEED: the rng seed of every scenario (default: a new one, printed in the tally)."""
    raw = os.environ.get("CHAOS_SEED", "").strip()
    return int(raw) if raw else int.from_bytes(os.urandom(4), "big")


def agent_env() -> dict[str, str]:
    """The environment of agent subprocesses: this worktree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def run_agent(*args: str, timeout: float = AGENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one agent command to completion (bounded) and return it."""
    return subprocess.run(
        agent_argv(*args),
        cwd=REPO,
        env=agent_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_agent(*args: str, log: Path, prefix: Iterable[str] = ()) -> subprocess.Popen[bytes]:
    """Start an agent command (optionally behind `prefix`, e.g. unshare) logging to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*prefix, *agent_argv(*args)],
            cwd=REPO,
            env=agent_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process we started, by its handle, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM by handle; SIGKILL if it does not exit within `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=30)


def wait_until(what: str, check: Callable[[], bool], timeout: float, poll: float = 0.25) -> None:
    """Poll `check` until it is true; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, AssertionError) as exc:  # not there yet
            last = exc
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


# --- a site: Pebble + HAProxy + an agent config ------------------------------------


@dataclass
class Site:
    """An AcmeStack plus one agent configuration with `names` certificates."""

    stack: AcmeStack
    root: Path
    names: dict[str, str]  # certificate name -> its domain
    config: Path = field(init=False)
    keys: dict[str, bytes] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def key_dir(self) -> Path:
        return self.root / "keys"

    def write_config(self, extra: str = "", **acme: Any) -> Path:
        """config.toml for the stack; `extra` is appended (e.g. a [daemon] table)."""
        self.key_dir.mkdir(mode=0o700, exist_ok=True)
        certs = [
            {
                "name": name,
                "domains": [domain],
                "key": str(self.key_dir / f"{name}.key"),
                "generate_key": True,
            }
            for name, domain in self.names.items()
        ]
        self.config = self.stack.write_config(
            self.root / "config.toml", certs, self.state_dir, **acme
        )
        if extra:
            with self.config.open("a") as f:
                f.write(extra.strip() + "\n")
        return self.config

    def set_runtime_api(self, addresses: list[str], timeout: float | None = None) -> None:
        """Point the config's [haproxy] runtime_api elsewhere (e.g. a fake)."""
        text = self.config.read_text()
        text = re.sub(
            r"^runtime_api = .*$",
            "runtime_api = [" + ", ".join(toml_value(a) for a in addresses) + "]",
            text,
            count=1,
            flags=re.M,
        )
        if timeout is not None:
            text = text.replace("[haproxy]\n", f"[haproxy]\ntimeout = {timeout}\n", 1)
        self.config.write_text(text)

    def remember_keys(self) -> None:
        """Record the stable key files' bytes (after the first issuance created them)."""
        self.keys = {n: (self.key_dir / f"{n}.key").read_bytes() for n in self.names}

    def bundle(self, name: str) -> Path:
        return self.stack.cert_dir / f"{name}.pem"


def daemon_table(reconcile: str = "2s", retry: str = "2s") -> str:
    return f'[daemon]\nreconcile_interval = "{reconcile}"\nretry_base = "{retry}"\n'


# --- invariants ---------------------------------------------------------------------

_PEM_KEY = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S
)


def _public(obj: Any) -> bytes:
    return bytes(
        obj.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def bundle_problems(path: Path) -> list[str]:
    """What is wrong with one HAProxy bundle: parse, key = leaf's key, chain present."""
    data = path.read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        return [f"{path}: certificates do not parse: {exc}"]
    keys = _PEM_KEY.findall(data)
    if len(keys) != 1:
        return [f"{path}: {len(keys)} private keys (want exactly 1)"]
    try:
        key = serialization.load_pem_private_key(keys[0], password=None)
    except ValueError as exc:
        return [f"{path}: private key does not parse: {exc}"]
    problems = []
    if _public(key.public_key()) != _public(certs[0].public_key()):
        problems.append(f"{path}: the private key does not match the leaf certificate")
    if len(certs) < 2:
        problems.append(f"{path}: leaf only, the issuer's certificate is missing (no chain)")
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            problems.append(f"{path}: {child.subject} is not issued by {parent.subject}: {exc}")
    return problems


def crt_list_entries(crt_list: Path) -> list[Path]:
    """The certificate files the crt-list names (relative to its directory)."""
    out = []
    for raw in crt_list.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            p = Path(line.split()[0])
            out.append(p if p.is_absolute() else crt_list.parent / p)
    return out


def haproxy_check(stack: AcmeStack) -> subprocess.CompletedProcess[str]:
    """`haproxy -c -f cfg` on the real binary, with the stack's environment."""
    proc = stack.haproxy
    return subprocess.run(
        [proc.binary, "-c", "-f", str(proc.config_path)],
        cwd=proc.workdir,
        env={**os.environ, **proc.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def temp_files(site: Site) -> list[Path]:
    """Leftover temp files next to the bundles and the crt-list."""
    dirs = {site.stack.cert_dir, site.stack.crt_list.parent}
    return sorted(
        p
        for d in dirs
        if d.is_dir()
        for p in d.iterdir()
        if p.name.startswith(".") or p.name.endswith(".tmp")
    )


def check_invariants(site: Site, *, after_restart: bool = False) -> None:
    """Files parse, keys match, crt-list loads, stable keys unchanged (+ no temp files
    once a restarted agent has started: `after_restart`)."""
    problems: list[str] = []
    for p in sorted(site.stack.cert_dir.glob("*.pem")):
        if not p.name.startswith("."):
            problems += bundle_problems(p)
    for entry in crt_list_entries(site.stack.crt_list):
        if not entry.exists():
            problems.append(f"crt-list {site.stack.crt_list} names a missing file {entry}")
    check = haproxy_check(site.stack)
    if check.returncode != 0:
        problems.append(
            f"`haproxy -c` refuses the config (exit {check.returncode}): "
            + (check.stdout + check.stderr).strip()[-800:]
        )
    for name, before in site.keys.items():
        now = (site.key_dir / f"{name}.key").read_bytes()
        if now != before:
            problems.append(f"stable key of {name!r} changed")
    if after_restart:
        left = temp_files(site)
        if left:
            problems.append(f"temp files left after a restarted agent's start: {left}")
    assert not problems, "invariants broken:\n  " + "\n  ".join(problems)


def status_json(site: Site, timeout: float = AGENT_TIMEOUT) -> list[dict[str, Any]]:
    cp = run_agent("status", "--json", "-c", str(site.config), timeout=timeout)
    assert cp.returncode == 0, f"status exited {cp.returncode}: {cp.stderr[-2000:]}"
    rows: list[dict[str, Any]] = json.loads(cp.stdout)
    return rows


def _show_serial(site: Site, path: Path) -> int | None:
    reply = site.stack.haproxy.admin_command(f"show ssl cert {path}")
    m = re.search(r"^Serial:\s*([0-9A-Fa-f]+)", reply, re.M)
    return int(m.group(1), 16) if m else None


def sync_problems(site: Site) -> list[str]:
    """Why HAProxy does not serve what the agent stored (empty: in sync everywhere)."""
    problems: list[str] = []
    rows = {r["name"]: r for r in status_json(site)}
    for name, domain in site.names.items():
        path = site.bundle(name)
        if not path.exists():
            problems.append(f"{name}: no bundle {path}")
            continue
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        want = leaf.serial_number
        row = rows.get(name)
        stored = row.get("serial") if row else None
        if stored is None or int(str(stored), 16) != want:
            problems.append(f"{name}: status says stored serial {stored}, bundle has {want:x}")
        entries = row.get("haproxy", []) if row else []
        if not entries:
            problems.append(f"{name}: status shows no HAProxy instance")
        for e in entries:
            if not e.get("in_sync") or e.get("served_serial") != f"{want:x}":
                problems.append(f"{name}: status says {e}, bundle has {want:x}")
        shown = _show_serial(site, path)
        if shown != want:
            shown_hex = "none" if shown is None else f"{shown:x}"
            problems.append(f"{name}: show ssl cert {path} serial {shown_hex}, bundle has {want:x}")
        served = served_leaf(site.stack.https_port, domain).serial_number
        if served != want:
            problems.append(f"{name}: TLS for {domain} serves {served:x}, bundle has {want:x}")
    return problems


def assert_in_sync(site: Site) -> None:
    problems = sync_problems(site)
    assert not problems, "HAProxy is not in sync with the agent:\n  " + "\n  ".join(problems)


def wait_in_sync(site: Site, timeout: float = SYNC_TIMEOUT) -> None:
    """Poll (bounded) until HAProxy serves every stored certificate."""
    deadline = time.monotonic() + timeout
    problems: list[str] = ["never checked"]
    while time.monotonic() < deadline:
        try:
            problems = sync_problems(site)
        except (OSError, ValueError, AssertionError) as exc:
            problems = [repr(exc)]
        if not problems:
            return
        time.sleep(1.0)
    raise AssertionError(f"HAProxy not in sync after {timeout} s:\n  " + "\n  ".join(problems))
