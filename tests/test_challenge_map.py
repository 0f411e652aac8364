"""Map mode: the registry decorator against a fake runtime API (retries, rollback,
restarts, deletes), its config keys, the runtime API argument checks, and the
haproxy-config output, which real HAProxy builds accept and answer from."""

from __future__ import annotations

import http.client
import logging
import subprocess
import time
from pathlib import Path

import pytest

from agent import challenge_map
from agent.challenge_map import ChallengeMapError, HAProxyMapRegistry, haproxy_version
from agent.challenges import MemoryChallengeRegistry
from agent.config import Config, ConfigError, load_config
from agent.haproxy_api import (
    CommandFailed,
    HAProxyConnectionError,
    ProcessInfo,
    RuntimeAPI,
    parse_map,
    parse_map_list,
)
from agent.haproxy_config import Options, full_config, render, render_text, write_bootstrap_files
from tests.support.haproxy import HAProxyProcess, _label_of, free_port

REPO = Path(__file__).resolve().parents[1]
TP = "dGh1bWJwcmludC1vZi10aGUtYWNjb3VudC1rZXktMDEyMzQ"
TOK_A = "tokenAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
TOK_B = "tokenBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


class FakeAPI:
    """Plays one HAProxy runtime API: a map, a process identity, scripted failures."""

    def __init__(self, name: str, maps: tuple[str, ...] = ("virt@acme",)) -> None:
        self.name = name
        self.maps = list(maps)
        self.entries: dict[str, str] = {}
        self.pid = 100
        self.down = 0  # the next N calls fail as unreachable (-1: always)
        self.del_down = 0
        self.calls: list[str] = []

    def _maybe_fail(self, command: str) -> None:
        self.calls.append(command)
        if self.down:
            self.down -= 1 if self.down > 0 else 0
            raise HAProxyConnectionError(self.name, command, "[Errno 111] Connection refused")

    def restart(self) -> None:
        self.pid += 1
        self.entries.clear()

    def show_info(self) -> ProcessInfo:
        self._maybe_fail("show info")
        return ProcessInfo(self.pid, 1000 + self.pid, "3.2.26-1")

    def cli_level(self) -> str:
        self._maybe_fail("show cli level")
        return "admin"

    def list_maps(self) -> list[str]:
        self._maybe_fail("show map")
        return list(self.maps)

    def put_map(self, map_name: str, token: str, key_authorization: str) -> None:
        self._maybe_fail(f"set map {map_name} {token}")
        if map_name not in self.maps:
            raise CommandFailed(self.name, "set map", "Unknown map identifier.")
        self.entries[token] = key_authorization

    def del_map(self, map_name: str, token: str) -> bool:
        self.calls.append(f"del map {map_name} {token}")
        if self.del_down:
            self.del_down -= 1
            raise HAProxyConnectionError(self.name, "del map", "[Errno 111] Connection refused")
        return self.entries.pop(token, None) is not None


def make(
    *apis: FakeAPI, timeout: float = 2.0, map_name: str | None = None
) -> tuple[HAProxyMapRegistry, MemoryChallengeRegistry, list[float]]:
    inner = MemoryChallengeRegistry()
    slept: list[float] = []
    registry = HAProxyMapRegistry(
        inner,
        apis,  # type: ignore[arg-type]
        map_name,
        default_file="/var/lib/x/acme-challenge.map",
        timeout=timeout,
        sleep=slept.append,
    )
    return registry, inner, slept


def ka(token: str) -> str:
    return f"{token}.{TP}"


def test_add_puts_the_token_on_every_instance_and_in_the_inner_registry() -> None:
    a, b = FakeAPI("a"), FakeAPI("b")
    registry, inner, _ = make(a, b)
    registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    assert a.entries == b.entries == {TOK_A: ka(TOK_A)}
    assert inner.lookup(TOK_A) == ka(TOK_A)
    assert registry.lookup(TOK_A) == ka(TOK_A)
    assert len(registry) == 1


def test_instance_down_briefly_is_retried_within_map_timeout() -> None:
    a, b = FakeAPI("a"), FakeAPI("b")
    b.down = 3
    registry, _, slept = make(a, b, timeout=5.0)
    registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    assert b.entries == {TOK_A: ka(TOK_A)}
    assert slept and all(0 < s <= 2.0 for s in slept)


def test_instance_down_past_map_timeout_fails_naming_instance_and_map_and_rolls_back() -> None:
    a, b = FakeAPI("a"), FakeAPI("unix:/run/b.sock")
    b.down = -1
    registry, inner, slept = make(a, b, timeout=1.0)
    with pytest.raises(ChallengeMapError) as info:
        registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    err = info.value
    assert err.instance == "unix:/run/b.sock"
    assert "unix:/run/b.sock" in str(err) and "virt@acme" in str(err)
    assert "Connection refused" in str(err)
    assert sum(slept) <= 1.0  # bounded by map_timeout
    assert a.entries == {}  # taken back out of the instance that had it
    assert inner.lookup(TOK_A) is None
    assert registry.pending() == {}


def test_retries_stop_when_the_waits_reach_map_timeout_whatever_the_clock() -> None:
    b = FakeAPI("b")
    b.down = -1
    registry, _, slept = make(b, timeout=30.0)  # sleeps are recorded, not slept
    with pytest.raises(ChallengeMapError):
        registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    assert sum(slept) <= 30.0
    assert 10 <= len(slept) <= 20  # 0.25, 0.5, 1, then 2 s steps


def test_challenge_map_error_is_an_acme_error_the_renewal_records_as_a_failure() -> None:
    from agent.issuer import AcmeError
    from agent.renewal import error_type

    err = ChallengeMapError("x", "a", "virt@acme")
    assert isinstance(err, AcmeError)  # issuer.issue re-raises AcmeErrors unchanged
    assert error_type(err) == "acme"


def test_remove_deletes_everywhere_and_a_failed_delete_is_retried_by_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = FakeAPI("a"), FakeAPI("b")
    registry, inner, _ = make(a, b)
    registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    b.del_down = 1
    with caplog.at_level(logging.WARNING, "agent.challenge_map"):
        registry.remove(TOK_A)
    assert "retried" in caplog.text
    assert a.entries == {} and b.entries == {TOK_A: ka(TOK_A)}
    assert inner.lookup(TOK_A) is None
    registry.poll()
    assert b.entries == {}


def test_poll_does_no_io_when_nothing_is_pending() -> None:
    a = FakeAPI("a")
    registry, _, _ = make(a)
    assert registry.poll() == []
    assert a.calls == []


def test_poll_puts_pending_tokens_back_on_a_restarted_or_returning_instance() -> None:
    a, b = FakeAPI("a"), FakeAPI("b")
    registry, _, _ = make(a, b)
    registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    registry.add(TOK_B, ka(TOK_B), time.time() + 60)
    assert registry.poll() == []  # nothing changed
    b.restart()
    assert registry.poll() == ["b"]
    assert b.entries == {TOK_A: ka(TOK_A), TOK_B: ka(TOK_B)}
    # Unreachable for one pass, then back (same process, entries cleared to prove the re-add).
    a.down = 1
    assert registry.poll() == []
    a.entries.clear()
    assert registry.poll() == ["a"]
    assert set(a.entries) == {TOK_A, TOK_B}


def test_expired_tokens_are_not_put_back() -> None:
    a = FakeAPI("a")
    now = [1000.0]
    registry = HAProxyMapRegistry(
        MemoryChallengeRegistry(clock=lambda: now[0]),
        [a],  # type: ignore[list-item]
        clock=lambda: now[0],
        sleep=lambda s: None,
    )
    registry.add(TOK_A, ka(TOK_A), 1010.0)
    now[0] = 1011.0
    a.restart()
    registry.poll()
    assert a.entries == {}


def test_map_is_picked_per_instance_virt_first_then_the_file() -> None:
    new, old = FakeAPI("new"), FakeAPI("old", maps=("/var/lib/x/acme-challenge.map",))
    registry, _, _ = make(new, old)
    registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    assert any(c.startswith("set map virt@acme ") for c in new.calls)
    assert any(c.startswith("set map /var/lib/x/acme-challenge.map ") for c in old.calls)


def test_instance_without_the_map_is_named_with_what_it_declares() -> None:
    a = FakeAPI("a", maps=("/etc/haproxy/hosts.map",))
    registry, _, _ = make(a, timeout=0.1)
    with pytest.raises(ChallengeMapError, match=r"declares no map virt@acme or /var/lib/x/"):
        registry.add(TOK_A, ka(TOK_A), time.time() + 60)
    assert registry.check_ready() == [
        (
            "a",
            "challenges.map",
            "HAProxy a declares no map virt@acme or /var/lib/x/acme-challenge.map; it declares "
            "/etc/haproxy/hosts.map: add the lines `haproxy-acme-agent haproxy-config` prints "
            "to haproxy.cfg",
        )
    ]


def test_bad_token_or_key_authorization_is_refused_before_anything_is_sent() -> None:
    a = FakeAPI("a")
    registry, inner, _ = make(a)
    with pytest.raises(ValueError, match="not an ACME token"):
        registry.add("a b", "a b.x", time.time() + 60)
    with pytest.raises(ValueError, match="not a key authorization"):
        registry.add(TOK_A, f"{TOK_B}.{TP}", time.time() + 60)
    with pytest.raises(ValueError, match="not a key authorization"):
        registry.add(TOK_A, f"{TOK_A}.x;show info", time.time() + 60)
    assert a.calls == [] and len(inner) == 0


def test_runtime_api_map_commands_check_their_arguments_without_io() -> None:
    api = RuntimeAPI("unix:/nonexistent/admin.sock")
    with pytest.raises(ValueError, match="not an ACME token"):
        api.add_map("virt@acme", "x y", "x y.z")
    with pytest.raises(ValueError, match="is not virt@NAME"):
        api.set_map("virt@ac me", TOK_A, ka(TOK_A))
    with pytest.raises(ValueError, match="is not virt@NAME"):
        api.del_map("relative.map", TOK_A)
    with pytest.raises(ValueError, match="is not virt@NAME"):
        api.show_map("/etc/a,b.map")
    with pytest.raises(HAProxyConnectionError):  # well-formed: it does try to connect
        api.del_map("virt@acme", TOK_A)


def test_map_replies_are_parsed() -> None:
    assert parse_map("0x55 tok tok.v1\n0x7f tok tok.v2\n0x56 other other.x\n\n") == {
        "tok": "tok.v1",
        "other": "other.x",
    }
    listing = (
        "# id (file) description\n"
        "0 (virt@acme) pattern loaded from file 'virt@acme' used by map at file "
        "'/x/haproxy.cfg' line 12. curr_ver=0 next_ver=0 entry_cnt=0\n"
        "1 (/etc/haproxy/a.map) pattern loaded from file '/etc/haproxy/a.map' used by map\n\n"
    )
    assert parse_map_list(listing) == ["virt@acme", "/etc/haproxy/a.map"]
    assert haproxy_version("2.6.12-1+deb12u4") == (2, 6)
    assert haproxy_version("3.2.26-1") == (3, 2)
    assert haproxy_version("") is None


# -- config -----------------------------------------------------------------------------


def write(tmp: Path, body: str, runtime_api: bool = True) -> Path:
    lines = [
        f'state_dir = "{tmp / "state"}"',
        "[acme]",
        'directory = "https://127.0.0.1:14000/dir"',
        "[haproxy]",
        f'cert_dir = "{tmp / "certs"}"',
    ]
    if runtime_api:
        lines.append(f'runtime_api = ["unix:{tmp / "admin.sock"}"]')
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def test_challenges_defaults_to_spoe_and_map_keys_load(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.challenges.answer == "spoe" and cfg.challenges.map is None
    assert challenge_map.from_config(cfg, MemoryChallengeRegistry()) is None
    (tmp_path / "maps").mkdir()
    cfg = load_config(
        write(tmp_path, '[challenges]\nanswer = "map"\nmap = "maps/acme.map"\nmap_timeout = 3\n')
    )
    assert cfg.challenges.map == str(tmp_path / "maps" / "acme.map")
    assert cfg.challenges.map_timeout == 3.0
    assert isinstance(challenge_map.from_config(cfg, MemoryChallengeRegistry()), HAProxyMapRegistry)


@pytest.mark.parametrize(
    ("body", "runtime_api", "key", "message"),
    [
        ('answer = "lua"', True, "challenges.answer", 'is not "spoe" or "map"'),
        ('answer = "map"', False, "haproxy.runtime_api", "needs at least one runtime API"),
        ('map = "virt@a b"', True, "challenges.map", "is not virt@NAME"),
        ('map = "/nonexistent-dir/acme.map"', True, "challenges.map", "does not exist"),
        ("map_timeout = 0", True, "challenges.map_timeout", "must be greater than 0"),
        ("answr = 1", True, "challenges.answr", "unknown key"),
    ],
)
def test_bad_challenges_config_names_file_and_key(
    tmp_path: Path, body: str, runtime_api: bool, key: str, message: str
) -> None:
    path = write(tmp_path, f"[challenges]\n{body}\n", runtime_api=runtime_api)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert message in info.value.message


# -- haproxy-config ---------------------------------------------------------------------


def map_config(tmp: Path, extra: str = "") -> Config:
    (tmp / "certs").mkdir(exist_ok=True)
    return load_config(write(tmp, f'[challenges]\nanswer = "map"\n{extra}'))


def test_haproxy_config_prints_map_lines_for_the_version_and_no_spoe(tmp_path: Path) -> None:
    cfg = map_config(tmp_path)
    new = render(cfg, Options(haproxy_version=(3, 0)))
    assert "map(virt@acme)" in new.http_frontend
    assert "filter spoe" not in new.http_frontend
    assert new.spoe_conf == "" and new.spoa_backend == ""
    old_file = tmp_path / "certs" / "acme-challenge.map"
    for version in ((2, 6), (2, 8), None):  # unknown: the file, which every version reads
        assert f"map({old_file})" in render(cfg, Options(haproxy_version=version)).http_frontend
    text = render_text(cfg, Options(haproxy_version=(2, 8)))
    assert "spoe-acme.conf" not in text and "acme-spoa" not in text
    assert "must exist (empty)" in text
    explicit = map_config(tmp_path, 'map = "virt@tokens"\n')
    assert "map(virt@tokens)" in render(explicit, Options(haproxy_version=(2, 6))).http_frontend


def test_bootstrap_creates_the_empty_map_file_and_never_truncates_it(tmp_path: Path) -> None:
    cfg = map_config(tmp_path)
    written = write_bootstrap_files(cfg)
    path = tmp_path / "certs" / "acme-challenge.map"
    assert path in written and path.read_bytes() == b""
    path.write_text("kept\n")
    assert path not in write_bootstrap_files(cfg)
    assert path.read_text() == "kept\n"


def _version_of(binary: str) -> tuple[int, int]:
    major, minor = _label_of(binary).split(".")[:2]
    return int(major), int(minor)


@pytest.mark.integration
def test_generated_map_config_answers_issued_tokens_on_every_haproxy(
    haproxy_bin: str, tmp_path: Path
) -> None:
    cfg = map_config(tmp_path)
    write_bootstrap_files(cfg)
    site_port, http_port = free_port(), free_port()
    text = full_config(
        cfg,
        Options(
            socket_group="0",
            http_bind=f"127.0.0.1:{http_port}",
            https_bind=f"127.0.0.1:{free_port()}",
            site=f"127.0.0.1:{site_port}",
            haproxy_version=_version_of(haproxy_bin),
        ),
    )
    text = text.replace("global\n", "global\n    noreuseport\n", 1)
    text += (
        f'\nfrontend site_stub\n    bind "127.0.0.1:{site_port}"\n'
        '    http-request return status 404 content-type text/plain string "site"\n'
    )
    check = subprocess.run(
        [haproxy_bin, "-c", "-f", "/dev/stdin"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with HAProxyProcess(haproxy_bin, text, {}, tmp_path / "h"):
        challenge_map.startup_check(cfg)  # admin level, map declared: no error
        registry = challenge_map.from_config(cfg, MemoryChallengeRegistry())
        assert registry is not None
        registry.add(TOK_A, ka(TOK_A), time.time() + 60)
        for token, expected in ((TOK_A, (200, ka(TOK_A).encode())), (TOK_B, (404, b"site"))):
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
            conn.request("GET", f"/.well-known/acme-challenge/{token}")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == expected
            conn.close()


@pytest.mark.integration
def test_shipped_haproxy_map_cfg_passes_haproxy_check(haproxy_bin: str, tmp_path: Path) -> None:
    from tests.support.certs import write_crt_list

    empty = tmp_path / "acme-challenge.map"
    empty.write_text("")
    crt_list = write_crt_list(tmp_path, "fallback.test")
    maps = [str(empty)] + (["virt@acme"] if _version_of(haproxy_bin) >= (3, 0) else [])
    for acme_map in maps:
        env = {
            "HAPROXY_ADMIN_SOCKET": str(tmp_path / "admin.sock"),
            "CRT_LIST": str(crt_list),
            "ACME_MAP": acme_map,
        }
        r = subprocess.run(
            [haproxy_bin, "-c", "-f", str(REPO / "haproxy" / "haproxy-map.cfg")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=env,
        )
        assert r.returncode == 0, (acme_map, r.stdout + r.stderr)


@pytest.mark.integration
def test_haproxy_config_asks_the_running_haproxy_for_its_version(
    haproxy_bin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    sock = tmp_path / "admin.sock"
    text = f'global\n    noreuseport\n    stats socket "{sock}" mode 600 level admin\n'
    cfg_path = write(tmp_path, '[challenges]\nanswer = "map"\n')
    with HAProxyProcess(haproxy_bin, text, {}, tmp_path / "h"):
        rc = main(["haproxy-config", "-c", str(cfg_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    version = _version_of(haproxy_bin)
    assert f"HAProxy {version[0]}.{version[1]}." in out
    if version >= (3, 0):
        assert "map(virt@acme)" in out
    else:
        assert f"map({tmp_path / 'certs' / 'acme-challenge.map'})" in out


# -- the daemon in map mode -------------------------------------------------------------


def test_daemon_in_map_mode_leaves_the_spoa_port_free_and_is_healthy(tmp_path: Path) -> None:
    import asyncio
    import socket
    import urllib.request

    from agent.daemon import Daemon

    (tmp_path / "certs").mkdir()
    spoa_port, metrics_port = free_port(), free_port()
    cfg = load_config(
        write(
            tmp_path,
            f'[spoa]\nlisten = "127.0.0.1:{spoa_port}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
            f'[daemon]\ncontrol_socket = "{tmp_path / "control.sock"}"\n'
            '[challenges]\nanswer = "map"\n',
        )
    )

    def probe() -> tuple[bool, int]:
        with socket.socket() as s:
            free = s.connect_ex(("127.0.0.1", spoa_port)) != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5) as r:
            return free, r.status

    async def main() -> tuple[bool, int]:
        daemon = Daemon(cfg)
        run = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + 30
        while not daemon._started and not run.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            return await asyncio.to_thread(probe)
        finally:
            daemon._stop.set()
            await asyncio.wait_for(run, 30)

    free, status = asyncio.run(main())
    assert free, "the SPOA port is bound in map mode"
    assert status == 200
