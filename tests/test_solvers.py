"""The solver seam (agent/solvers.py + issuer), DNS config and agent/dns01.py in unit tests.

The issuer runs against the scriptable stand-in CA (tests/support/fake_acme.py);
the real proof with BIND and Pebble is tests/integration/test_dns01_bind.py.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from agent.challenges import MemoryChallengeRegistry
from agent.cli import main
from agent.config import AcmeConfig, ConfigError, DnsZoneConfig, Listen, load_config
from agent.dns01 import (
    Dns01Solver,
    acme_record_name,
    check_persist_record,
    parse_persist_value,
    persist_record_name,
    persist_record_value,
    wait_visible,
    zone_for,
)
from agent.issuer import ChallengeSetupFailed, Issuer, ValidationFailed
from agent.renewal import check_certificate
from agent.solvers import CHALLENGE_RESULTS, ChallengeTask, Solver, SolverError
from agent.storage import FileStorage
from tests.support.fake_acme import FakeAcme
from tests.support.haproxy import free_port
from tests.support.issued import TinyCA

CSR_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def ca() -> Iterator[FakeAcme]:
    with FakeAcme() as fake:
        yield fake


class RecordingSolver(Solver):
    """Records calls; `fail` makes present raise after recording."""

    def __init__(self, challenge_type: str, fail: str | None = None) -> None:
        self.challenge_type = challenge_type
        self.fail = fail
        self.calls: list[tuple[str, str, list[ChallengeTask]]] = []

    def present(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        self.calls.append(("present", cert_name, list(tasks)))
        if self.fail:
            raise SolverError(self.fail)

    def cleanup(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        self.calls.append(("cleanup", cert_name, list(tasks)))


def script_authz(fake: FakeAcme, challenges: list[dict[str, Any]], wildcard: bool = False) -> None:
    """newOrder /order -> authz /authz/1 offering `challenges`, valid on the second poll,
    then finalize and certificate (an empty chain: the tests stop before checks)."""
    b = fake.base
    ident = {"type": "dns", "value": "example.com"}
    authz: dict[str, Any] = {"status": "pending", "identifier": ident, "challenges": challenges}
    if wildcard:
        authz["wildcard"] = True
    valid = {**authz, "status": "valid"}
    order = {
        "status": "pending",
        "identifiers": [{"type": "dns", "value": "*.example.com" if wildcard else "example.com"}],
        "authorizations": [b + "/authz/1"],
        "finalize": b + "/finalize/1",
    }
    fake.script("/order", [(201, {"Location": b + "/order/1"}, order)])
    fake.script("/authz/1", [(200, {}, authz), (200, {}, valid)])
    for c in challenges:
        path = c["url"][len(b) :]
        fake.script(
            path, [(200, {"Link": f'<{b}/authz/1>;rel="up"'}, {**c, "status": "processing"})]
        )
    done = {**order, "status": "valid", "certificate": b + "/cert/1"}
    fake.script("/finalize/1", [(200, {"Location": b + "/order/1"}, done)])
    fake.script("/order/1", [(200, {}, done)])
    fake.script("/cert/1", [(200, {"Content-Type": "application/pem-certificate-chain"}, b"x")])


def issuer_with(tmp_path: Path, ca: FakeAcme, solver: Solver) -> Issuer:
    cfg = AcmeConfig(directory=ca.directory_url, email="ops@example.com", timeout=5.0,
                     poll_interval=0.01)  # fmt: skip
    return Issuer(
        cfg, FileStorage(tmp_path / "state"), MemoryChallengeRegistry(),
        solvers={solver.challenge_type: solver},
    )  # fmt: skip


def chall(ca: FakeAcme, typ: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"type": typ, "url": f"{ca.base}/chall/{n}", "status": "pending", **extra}


TOKEN = "tok_" + "A" * 40


def test_authorization_without_the_configured_type_names_certificate_and_offered_types(
    tmp_path: Path, ca: FakeAcme
) -> None:
    script_authz(
        ca, [chall(ca, "http-01", 1, token=TOKEN), chall(ca, "tls-alpn-01", 2, token=TOKEN)]
    )
    solver = RecordingSolver("dns-01")
    issuer = issuer_with(tmp_path, ca, solver)
    csr = keys.csr_pem(keys.build_csr(CSR_KEY, ["example.com"]))
    with pytest.raises(ValidationFailed) as e:
        issuer.issue(csr, ["example.com"], challenge="dns-01", cert_name="site")
    msg = str(e.value)
    assert "certificate site" in msg
    assert "no dns-01 challenge for example.com" in msg
    assert "offered: http-01, tls-alpn-01" in msg
    assert solver.calls == []
    assert ca.posts("/chall/1") == [] and ca.posts("/chall/2") == []


def test_dns01_picks_the_dns_challenge_presents_before_answering_and_cleans_up(
    tmp_path: Path, ca: FakeAcme
) -> None:
    script_authz(
        ca, [chall(ca, "http-01", 1, token=TOKEN), chall(ca, "dns-01", 2, token=TOKEN)],
        wildcard=True,
    )  # fmt: skip
    solver = RecordingSolver("dns-01")
    issuer = issuer_with(tmp_path, ca, solver)
    csr = keys.csr_pem(keys.build_csr(CSR_KEY, ["*.example.com"]))
    before = CHALLENGE_RESULTS[("dns-01", "valid")]
    issuer.issue(csr, ["*.example.com"], challenge="dns-01", cert_name="wild")
    (kind1, name1, tasks), (kind2, _, tasks2) = solver.calls
    assert (kind1, kind2, name1) == ("present", "cleanup", "wild")
    assert tasks == tasks2
    (task,) = tasks
    assert task.domain == "example.com" and task.wildcard and task.name == "*.example.com"
    # The TXT value is base64url(SHA-256(key authorization)), 43 characters.
    assert len(task.validation) == 43 and "." not in task.validation
    assert ca.posts("/chall/1") == []
    assert ca.posts("/chall/2") == [{}]
    assert CHALLENGE_RESULTS[("dns-01", "valid")] == before + 1


def test_dns_persist01_answers_with_an_empty_object_and_publishes_nothing(
    tmp_path: Path, ca: FakeAcme
) -> None:
    persist = chall(ca, "dns-persist-01", 1, **{"issuer-domain-names": ["ca.example"]})
    script_authz(ca, [chall(ca, "dns-01", 2, token=TOKEN), persist])
    solver = RecordingSolver("dns-persist-01")
    issuer = issuer_with(tmp_path, ca, solver)
    csr = keys.csr_pem(keys.build_csr(CSR_KEY, ["example.com"]))
    issuer.issue(csr, ["example.com"], challenge="dns-persist-01", cert_name="p")
    assert ca.posts("/chall/1") == [{}]
    assert ca.posts("/chall/2") == []
    assert solver.calls[0][2][0].validation == ""


def test_solver_failure_asks_the_ca_nothing_and_still_cleans_up(
    tmp_path: Path, ca: FakeAcme
) -> None:
    script_authz(ca, [chall(ca, "dns-01", 1, token=TOKEN)])
    solver = RecordingSolver("dns-01", fail="zone example.com: server 127.0.0.1:53 said no")
    issuer = issuer_with(tmp_path, ca, solver)
    csr = keys.csr_pem(keys.build_csr(CSR_KEY, ["example.com"]))
    before = CHALLENGE_RESULTS[("dns-01", "error")]
    with pytest.raises(ChallengeSetupFailed, match=r"certificate c: zone example\.com: server"):
        issuer.issue(csr, ["example.com"], challenge="dns-01", cert_name="c")
    assert [c[0] for c in solver.calls] == ["present", "cleanup"]
    assert ca.posts("/chall/1") == []
    assert CHALLENGE_RESULTS[("dns-01", "error")] == before + 1


class SlowSolver(RecordingSolver):
    def present(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        super().present(cert_name, tasks)
        time.sleep(0.8)  # longer than the order's whole acme.timeout below


def test_dns_propagation_wait_does_not_eat_the_orders_deadline(
    tmp_path: Path, ca: FakeAcme
) -> None:
    script_authz(ca, [chall(ca, "dns-01", 1, token=TOKEN)])
    solver = SlowSolver("dns-01")
    cfg = AcmeConfig(directory=ca.directory_url, email="ops@example.com", timeout=0.5,
                     poll_interval=0.01)  # fmt: skip
    issuer = Issuer(cfg, FileStorage(tmp_path / "state"), MemoryChallengeRegistry(),
                    solvers={"dns-01": solver})  # fmt: skip
    issuer.connect()
    csr = keys.csr_pem(keys.build_csr(CSR_KEY, ["example.com"]))
    issued = issuer.issue(csr, ["example.com"], challenge="dns-01", cert_name="slow")
    assert issued.fullchain_pem == "x"
    assert ca.posts("/chall/1") == [{}]


def test_wildcard_leaf_passes_the_install_checks() -> None:
    tiny = TinyCA()
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    leaf = tiny.leaf(key, ["example.com", "*.example.com"], now - 60, now + 86400)
    checked = check_certificate(tiny.fullchain(leaf), key, ["*.example.com", "example.com"],
                                [], now)  # fmt: skip
    assert sorted(keys.cert_domains(checked.leaf)) == ["*.example.com", "example.com"]


# --- config ----------------------------------------------------------------------------

BASE = """\
state_dir = "state"
[acme]
directory = "https://127.0.0.1:14000/dir"
"""


def cert(domains: str, challenge: str | None = None) -> str:
    line = f'challenge = "{challenge}"\n' if challenge else ""
    return (
        textwrap.dedent(f"""\
        [[certificates]]
        name = "w"
        domains = {domains}
        key = "k.pem"
        generate_key = true
        """)
        + line
    )


def zone(tmp_path: Path, **over: str) -> str:
    secret = tmp_path / "tsig.secret"
    if not secret.exists():
        secret.write_text("c2VjcmV0\n")
        secret.chmod(0o600)
    fields = {
        "zone": '"example.com"',
        "server": '"127.0.0.1:5353"',
        "tsig_key_name": '"acme"',
        "tsig_secret_file": f'"{secret}"',
        **over,
    }
    return "[[dns]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v)


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(body)
    return p


def test_http01_wildcard_is_refused_by_check_config_with_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, BASE + cert('["example.com", "*.example.com"]'))
    rc = main(["check-config", "-c", str(config)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "certificates[0].domains[1]" in err
    assert "wildcard" in err and "dns-01" in err
    assert not (tmp_path / "state").exists()


def test_dns01_wildcard_in_a_configured_zone_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE + cert('["example.com", "*.Example.com"]', "dns-01") + zone(tmp_path))
    )
    (c,) = cfg.certificates
    assert c.challenge == "dns-01"
    assert c.domains == ("example.com", "*.example.com")
    (z,) = cfg.dns
    assert z.zone == "example.com" and z.server == Listen("127.0.0.1", 5353)
    assert z.tsig_algorithm == "hmac-sha256" and z.propagation_timeout == 120


@pytest.mark.parametrize(
    ("domains", "challenge", "zone_over", "key", "needle"),
    [
        ('["a.other.org"]', "dns-01", {}, "certificates[0].domains[0]", "no [[dns]] zone"),
        ('["*.*.example.com"]', "dns-01", {}, "certificates[0].domains[0]", "leftmost label"),
        ('["a.example.com"]', "tls-alpn-01", {}, "certificates[0].challenge", "is not"),
        ('["a.example.com"]', "dns-01", {"hook": '["/bin/true"]'}, "dns[0].hook", "either"),
        ('["a.example.com"]', "dns-01", {"tsig_key_name": ""}, "dns[0].tsig_key_name",
         "is required"),
        ('["a.example.com"]', "dns-01", {"tsig_algorithm": '"md5"'}, "dns[0].tsig_algorithm",
         "is not one of"),
    ],
)  # fmt: skip
def test_bad_dns_settings_name_the_key(
    tmp_path: Path, domains: str, challenge: str, zone_over: dict[str, str], key: str, needle: str
) -> None:
    body = BASE + cert(domains, challenge) + zone(tmp_path, **zone_over)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, body))
    assert e.value.key == key
    assert needle in e.value.message


def test_tsig_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    body = BASE + cert('["a.example.com"]', "dns-01") + zone(tmp_path)
    (tmp_path / "tsig.secret").chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, body))
    assert e.value.key == "dns[0].tsig_secret_file"
    assert "chmod 600" in e.value.message


# --- dns01 helpers ---------------------------------------------------------------------


def z(name: str, **kw: Any) -> DnsZoneConfig:
    return DnsZoneConfig(zone=name, **kw)


def test_record_names_and_longest_zone_match() -> None:
    zones = [z("example.com"), z("sub.example.com")]
    assert acme_record_name("*.example.com") == "_acme-challenge.example.com."
    assert acme_record_name("www.example.com") == "_acme-challenge.www.example.com."
    assert zone_for("*.a.sub.example.com", zones) == zones[1]
    assert zone_for("example.com", zones) == zones[0]
    assert zone_for("badexample.com", zones) is None


def test_propagation_wait_gives_up_naming_zone_server_and_record() -> None:
    silent = Listen("127.0.0.1", free_port())  # nothing answers there
    with pytest.raises(SolverError) as e:
        wait_visible({"example.com": [(silent, "_acme-challenge.example.com.", {"v"})]}, 0.3,
                     "challenge value")  # fmt: skip
    msg = str(e.value)
    assert "zone example.com" in msg and str(silent) in msg
    assert "_acme-challenge.example.com." in msg


def hook_zone(tmp_path: Path, script: str, timeout: float = 5.0) -> DnsZoneConfig:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n" + script)
    hook.chmod(0o755)
    return DnsZoneConfig(zone="example.com", hook=(str(hook),), hook_timeout=timeout,
                         check_servers=(Listen("127.0.0.1", free_port()),),
                         propagation_timeout=0.2)  # fmt: skip


def task(domain: str, value: str, wildcard: bool = False) -> ChallengeTask:
    return ChallengeTask(domain, wildcard, None, value)  # type: ignore[arg-type]


def test_hook_gets_documented_arguments_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    zone_cfg = hook_zone(
        tmp_path, f'echo "$@|$ACME_ACTION|$ACME_DOMAIN|$CERTBOT_VALIDATION" >> {out}\n'
    )
    solver = Dns01Solver([zone_cfg], FileStorage(tmp_path / "st"))
    tasks = [task("www.example.com", "val1")]
    with pytest.raises(SolverError, match="does not answer"):  # nothing serves the check
        solver.present("c", tasks)
    solver.cleanup("c", tasks)
    assert out.read_text().splitlines() == [
        "add _acme-challenge.www.example.com. val1 example.com|add|www.example.com|val1",
        "remove _acme-challenge.www.example.com. val1 example.com|remove|www.example.com|val1",
    ]


def test_hook_timeout_is_reported(tmp_path: Path) -> None:
    solver = Dns01Solver(
        [hook_zone(tmp_path, "sleep 5\n", timeout=0.2)], FileStorage(tmp_path / "st")
    )
    with pytest.raises(SolverError, match=r"did not finish within 0.2 s"):
        solver.present("c", [task("example.com", "v")])


def test_recover_removes_records_of_dead_processes_only(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    zone_cfg = hook_zone(tmp_path, f'echo "$1 $3" >> {out}\n')
    storage = FileStorage(tmp_path / "st")
    dead = _dead_pid()
    now = time.time()
    host = socket.gethostname()
    for name, pid, value in (("gone", dead, "old"), ("alive", os.getppid(), "busy")):
        entry = {"certificate": name, "pid": pid, "host": host, "created": now,
                 "records": [{"zone": "example.com", "name": "_acme-challenge.example.com.",
                              "value": value}]}  # fmt: skip
        storage.store(f"dns/pending/{name}-x.json", json.dumps(entry).encode())
    Dns01Solver([zone_cfg], storage).recover()
    assert out.read_text().splitlines() == ["remove old"]
    assert storage.list("dns/pending") == ["dns/pending/alive-x.json"]


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- dns-persist-01 --------------------------------------------------------------------


def test_persist_record_format() -> None:
    assert persist_record_name("*.example.com") == "_validation-persist.example.com."
    v = persist_record_value("ca.example", "https://ca.example/acct/1", wildcard=True)
    assert v == "ca.example; accounturi=https://ca.example/acct/1; policy=wildcard"
    assert parse_persist_value(v) == (
        "ca.example",
        {"accounturi": "https://ca.example/acct/1", "policy": "wildcard"},
    )


def test_persist_check_reports_unreachable_server() -> None:
    silent = Listen("127.0.0.1", free_port())
    problem = check_persist_record([silent], "example.com", ["ca.example"], "u", False)
    assert problem is not None and "_validation-persist.example.com." in problem


def test_leftovers_are_recovered_once_without_the_ca_and_a_broken_journal_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The daemon calls recover_leftovers at start, so DNS records a killed order
    # left go before any order (the CA is not even reachable here).
    class Recovering(RecordingSolver):
        recovered = 0

        def recover(self) -> None:
            type(self).recovered += 1
            raise OSError("journal unreadable")

    cfg = AcmeConfig(directory="https://127.0.0.1:1/dir", email="ops@example.com", timeout=1.0)
    solver = Recovering("dns-01")
    issuer = Issuer(cfg, FileStorage(tmp_path / "state"), MemoryChallengeRegistry(),
                    solvers={"dns-01": solver})  # fmt: skip
    issuer.recover_leftovers()
    issuer.recover_leftovers()
    assert Recovering.recovered == 1
    assert "journal unreadable" in caplog.text
