"""dns-persist-01 (draft-ietf-acme-dns-persist): one static TXT record per name, bound to
the ACME account, published once by the operator; orders then write nothing to DNS.

- `records_for(config, cert, issuer)` asks the CA (one order whose challenges
  are read, never answered) for each authorization's issuer domain names and
  builds the `_validation-persist.<name>` records: one per base name,
  `"<issuer-domain-name>; accounturi=<account URI>"`, with `; policy=wildcard`
  when the certificate holds `*.<name>` (one record then covers the wildcard
  and the name itself). The expectation is stored at `dns/persist/<cert>.json`
  so `status` can check the published records without asking the CA.
- `record_problems(config, cert, storage)` reads the records back from DNS:
  the holding `[[dns]]` zone's `check_servers` (or its NS set), else the
  system's resolvers; returns what is missing or wrong, or [] when all is well.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dns.resolver

from agent import layout
from agent.config import CertificateConfig, Config, Listen
from agent.dns01 import (
    authoritative_servers,
    check_persist_record,
    persist_record_name,
    persist_record_value,
    zone_for,
)
from agent.issuer import Issuer
from agent.solvers import SolverError
from agent.storage import Storage


@dataclass(frozen=True)
class PersistRecord:
    """One `_validation-persist` TXT record to publish."""

    domain: str  # base name (no "*.")
    wildcard: bool
    name: str  # record name with trailing dot
    value: str
    issuer_domain_names: tuple[str, ...]
    account_uri: str

    def zone_file_line(self) -> str:
        return f'{self.name} 300 IN TXT "{self.value}"'


def records_for(
    config: Config, cert: CertificateConfig, issuer: Issuer, storage: Storage
) -> list[PersistRecord]:
    """The records `cert` needs (see the module docstring); stores the expectation."""
    challenges = issuer.persist_challenges(cert.domains)
    by_domain: dict[str, PersistRecord] = {}
    wild = {d.removeprefix("*.") for d in cert.domains if d.startswith("*.")}
    for c in challenges:
        if not c.issuer_domain_names:
            raise SolverError(
                f"certificate {cert.name}: the CA's dns-persist-01 challenge for {c.domain} "
                "names no issuer domain"
            )
        wildcard = c.domain in wild
        by_domain[c.domain] = PersistRecord(
            domain=c.domain,
            wildcard=wildcard,
            name=persist_record_name(c.domain),
            value=persist_record_value(c.issuer_domain_names[0], c.account_uri, wildcard),
            issuer_domain_names=c.issuer_domain_names,
            account_uri=c.account_uri,
        )
    records = [by_domain[d] for d in sorted(by_domain)]
    data = {"certificate": cert.name, "records": [asdict(r) for r in records]}
    storage.store(layout.dns_persist_key(cert.name), (json.dumps(data, indent=2) + "\n").encode())
    return records


def _servers(config: Config, name: str) -> Sequence[Listen]:
    zone = zone_for(name, config.dns)
    if zone is not None:
        return authoritative_servers(zone)
    return [Listen(str(ns), 53) for ns in dns.resolver.Resolver().nameservers]


def record_problems(config: Config, cert: CertificateConfig, storage: Storage) -> list[str]:
    """What is missing or wrong in DNS for `cert`'s dns-persist-01 records ([] = all good)."""
    try:
        data = json.loads(storage.load(layout.dns_persist_key(cert.name)))
    except (OSError, ValueError):
        return [f"the records are not known yet: run `haproxy-acme-agent dns-persist {cert.name}`"]
    problems: list[str] = []
    for r in data.get("records", []):
        try:
            servers = _servers(config, r["domain"])
        except SolverError as e:
            problems.append(str(e))
            continue
        problem = check_persist_record(
            servers, r["domain"], r["issuer_domain_names"], r["account_uri"], r["wildcard"]
        )
        if problem:
            problems.append(problem)
    return problems
