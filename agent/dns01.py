"""dns-01 (RFC 8555 section 8.4) over RFC 2136 dynamic updates signed with TSIG, or a hook.

`Dns01Solver(zones, storage)` serves every certificate whose `challenge` is
"dns-01". For each authorization it publishes a TXT record
`_acme-challenge.<name>` (a wildcard `*.example.com` and its apex share one
name, with two values) in the longest configured `[[dns]]` zone that holds the
name:

- `present`: writes a journal entry first (`dns/pending/<cert>-<hash of the values>.json`
  in the Storage, atomic), then adds all the order's records, zone by zone, in
  one update per zone (RFC 2136 + TSIG: `Rfc2136Publisher`; or the zone's
  hook: `HookPublisher`), then waits once until every authoritative server of
  every zone involved answers every value: the zone's `check_servers`, or the
  zone's NS set (looked up at the primary, or the system resolver for hook
  zones) on port 53. Bounded by the zone's `propagation_timeout` (seconds);
  the elapsed time is logged.
- `cleanup`: deletes exactly the values it added (other TXT values at the same
  name, e.g. a concurrent order's, stay) and then the journal entry. A failed
  removal keeps the journal entry so the next start retries.
- `recover`: removes the records of journal entries left by a process that is
  gone (another host's entries, or older than JOURNAL_MAX_AGE, count as gone
  too) and deletes those entries.

A refused update (wrong TSIG secret, key unknown to the server, update not
allowed) raises `SolverError` naming the zone, the server and the key name.

Hook contract (docs/dns.md): the program is run as
`PROGRAM ACTION RECORD VALUE ZONE` with ACTION "add" or "remove", RECORD the
full record name with trailing dot (`_acme-challenge.www.example.com.`), VALUE
the TXT value, ZONE the configured zone; the same in the environment as
ACME_ACTION, ACME_RECORD, ACME_VALUE, ACME_ZONE, ACME_DOMAIN (the name being
validated), plus certbot's CERTBOT_DOMAIN and CERTBOT_VALIDATION so scripts
written for `certbot --manual-auth-hook` adapt easily. It must exit 0 within
`hook_timeout` seconds; otherwise its exit status and stderr are reported.

dns-persist-01 (draft-ietf-acme-dns-persist): `persist_record(...)` builds the
`_validation-persist.<name>` TXT record and `check_persist_record` reads it
back from the zone's servers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.tsig
import dns.tsigkeyring
import dns.update

from agent import layout
from agent.config import DnsZoneConfig, Listen
from agent.solvers import ChallengeTask, Solver, SolverError
from agent.storage import Storage, StorageKeyError

log = logging.getLogger(__name__)

TXT_TTL = 60  # seconds; short, the record lives for one validation
QUERY_TIMEOUT = 3.0  # seconds per DNS query / update
JOURNAL_PREFIX = layout.DNS_PENDING
JOURNAL_MAX_AGE = 86400.0  # s: an entry this old is a leftover even if its pid is alive
_POLL_START = 0.1  # s between propagation checks, doubled up to _POLL_MAX
_POLL_MAX = 2.0


def acme_record_name(domain: str) -> str:
    """`_acme-challenge.<domain>.` for a name as the CA gives it (no "*.")."""
    return f"_acme-challenge.{domain.removeprefix('*.').rstrip('.')}."


def zone_for(name: str, zones: Iterable[DnsZoneConfig]) -> DnsZoneConfig | None:
    """The zone with the longest name that holds `name` (with or without "*."), or None."""
    bare = name.removeprefix("*.").rstrip(".").lower()
    best: DnsZoneConfig | None = None
    for z in zones:
        zone = z.zone.rstrip(".").lower()
        if (bare == zone or bare.endswith("." + zone)) and (
            best is None or len(zone) > len(best.zone.rstrip("."))
        ):
            best = z
    return best


def _txt(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])


# --- publishers ------------------------------------------------------------------------


class Publisher(ABC):
    """Adds and removes TXT records in one zone."""

    def __init__(self, zone: DnsZoneConfig) -> None:
        self.zone = zone

    @abstractmethod
    def add(self, records: Sequence[tuple[str, str]]) -> None:
        """Add every (record name with trailing dot, value) TXT; SolverError on failure."""

    @abstractmethod
    def remove(self, records: Sequence[tuple[str, str]]) -> None:
        """Remove exactly these TXT values (idempotent); SolverError on failure."""


def read_tsig_secret(zone: DnsZoneConfig) -> bytes:
    """The zone's TSIG secret (base64 in `tsig_secret_file`), decoded; SolverError if bad."""
    path = zone.tsig_secret_file
    assert path is not None
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise SolverError(f"zone {zone.zone}: cannot read the TSIG secret file {path}: "
                          f"{e.strerror}") from None  # fmt: skip
    # Accept a BIND key file too: the value of its `secret "...";` line.
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("secret"):
            text = line.split('"')[1] if '"' in line else line.split()[-1].rstrip(";")
            break
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SolverError(f"zone {zone.zone}: the TSIG secret in {path} is not base64") from None


class Rfc2136Publisher(Publisher):
    """RFC 2136 UPDATE over TCP to the zone's primary, signed with the zone's TSIG key."""

    def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        z = self.zone
        assert z.server is not None
        where = f"{z.server}"
        key = f"key {z.tsig_key_name} ({z.tsig_algorithm})"
        try:
            response = dns.query.tcp(
                update, z.server.host, timeout=QUERY_TIMEOUT, port=z.server.port
            )
        except dns.tsig.PeerError as e:
            why = {
                dns.tsig.PeerBadKey: "the server does not know this key name/algorithm",
                dns.tsig.PeerBadSignature: "the signature does not match: wrong secret?",
                dns.tsig.PeerBadTime: "clocks differ too much",
            }.get(type(e), type(e).__name__)
            raise SolverError(
                f"zone {z.zone}: server {where} refused the update signed with {key}: "
                f"TSIG error, {why}"
            ) from None
        except (dns.exception.DNSException, OSError) as e:
            raise SolverError(
                f"zone {z.zone}: {what} at server {where} with {key} failed: "
                f"{type(e).__name__}: {e}"
            ) from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            hint = {
                dns.rcode.NOTAUTH: " (the server does not accept this TSIG key or secret)",
                dns.rcode.REFUSED: " (the server's update policy does not allow it)",
                dns.rcode.NOTZONE: " (the name is not in the zone)",
            }.get(rcode, "")
            raise SolverError(
                f"zone {z.zone}: server {where} answered {dns.rcode.to_text(rcode)} to the "
                f"{what} signed with {key}{hint}"
            )

    def _update(self) -> dns.update.UpdateMessage:
        z = self.zone
        assert z.tsig_key_name is not None
        keyring = {dns.name.from_text(z.tsig_key_name): read_tsig_secret(z)}
        return dns.update.UpdateMessage(
            z.zone.rstrip(".") + ".",
            keyring=keyring,
            keyname=dns.name.from_text(z.tsig_key_name),
            keyalgorithm=z.tsig_algorithm,
        )

    def add(self, records: Sequence[tuple[str, str]]) -> None:
        upd = self._update()
        for name, value in records:
            upd.add(name, TXT_TTL, _txt(value))
        self._send(upd, f"update adding {len(records)} TXT record(s)")

    def remove(self, records: Sequence[tuple[str, str]]) -> None:
        upd = self._update()
        for name, value in records:
            upd.delete(name, _txt(value))
        self._send(upd, f"update removing {len(records)} TXT record(s)")


class HookPublisher(Publisher):
    """Runs the zone's hook program once per record (see the module docstring)."""

    def _run(self, action: str, name: str, value: str) -> None:
        z = self.zone
        domain = name.removeprefix("_acme-challenge.").rstrip(".")
        env = {
            **os.environ,
            "ACME_ACTION": action,
            "ACME_RECORD": name,
            "ACME_VALUE": value,
            "ACME_ZONE": z.zone,
            "ACME_DOMAIN": domain,
            "CERTBOT_DOMAIN": domain,
            "CERTBOT_VALIDATION": value,
        }
        argv = [*z.hook, action, name, value, z.zone]
        try:
            proc = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=z.hook_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SolverError(
                f"zone {z.zone}: dns hook {z.hook[0]} {action} {name} did not finish within "
                f"{z.hook_timeout:g} s (killed)"
            ) from None
        except OSError as e:
            raise SolverError(
                f"zone {z.zone}: cannot run dns hook {z.hook[0]}: {e.strerror}"
            ) from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-500:] or "no stderr"
            raise SolverError(
                f"zone {z.zone}: dns hook {z.hook[0]} {action} {name} exited with status "
                f"{proc.returncode}: {err}"
            )

    def add(self, records: Sequence[tuple[str, str]]) -> None:
        for name, value in records:
            self._run("add", name, value)

    def remove(self, records: Sequence[tuple[str, str]]) -> None:
        for name, value in records:
            self._run("remove", name, value)


def publisher_for(zone: DnsZoneConfig) -> Publisher:
    return HookPublisher(zone) if zone.hook else Rfc2136Publisher(zone)


# --- looking records up ----------------------------------------------------------------


def query_txt(server: Listen, name: str, timeout: float = QUERY_TIMEOUT) -> set[str]:
    """The TXT values at `name` as `server` answers them (UDP, TCP when truncated).

    Each value is its character-strings joined. Raises dns.exception.DNSException
    or OSError when the server does not answer.
    """
    q = dns.message.make_query(name, dns.rdatatype.TXT)
    response, _ = dns.query.udp_with_fallback(q, server.host, timeout=timeout, port=server.port)
    values: set[str] = set()
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT:
            for rd in rrset:
                values.add(b"".join(rd.strings).decode(errors="replace"))
    return values


def authoritative_servers(zone: DnsZoneConfig) -> list[Listen]:
    """Where to check a zone's records: `check_servers`, else its NS set on port 53."""
    if zone.check_servers:
        return list(zone.check_servers)
    zname = zone.zone.rstrip(".") + "."
    resolver = dns.resolver.Resolver()
    resolver.lifetime = QUERY_TIMEOUT
    if zone.server is not None:
        resolver.nameservers = [zone.server.host]
        resolver.port = zone.server.port
    try:
        targets = [str(r.target) for r in resolver.resolve(zname, "NS")]
    except dns.exception.DNSException as e:
        raise SolverError(f"zone {zone.zone}: cannot look up its NS records: {e}") from None
    servers: list[Listen] = []
    for target in targets:
        # In-zone name servers are known to the primary (glue); others to the system.
        for res in (resolver, dns.resolver.get_default_resolver()):
            found: list[Listen] = []
            for rdtype in ("A", "AAAA"):
                try:
                    answer = res.resolve(target, rdtype, lifetime=QUERY_TIMEOUT)
                except dns.exception.DNSException:
                    continue
                found += [Listen(r.address, 53) for r in answer]
            if found:
                servers += [s for s in found if s not in servers]
                break
    if not servers:
        raise SolverError(
            f"zone {zone.zone}: no address for its name servers ({', '.join(targets)})"
        )
    return servers


def wait_visible(
    wanted: dict[str, list[tuple[Listen, str, set[str]]]], timeout: float, what: str
) -> float:
    """Poll until each server answers every wanted value at each name; return seconds waited.

    `wanted` maps a zone name to (server, record name, values) triples. Raises
    SolverError naming the zone, server and record still missing after `timeout` s.
    """
    start = time.monotonic()
    deadline = start + timeout
    pending = [(zone, *t) for zone, triples in wanted.items() for t in triples]
    delay = _POLL_START
    last_problem = ""
    while True:
        still = []
        for zone, server, name, values in pending:
            try:
                seen = query_txt(server, name, timeout=min(QUERY_TIMEOUT, max(0.2, timeout)))
            except (dns.exception.DNSException, OSError) as e:
                last_problem = f"{type(e).__name__}: {e}"
                still.append((zone, server, name, values))
                continue
            if not values <= seen:
                last_problem = f"{len(values - seen)} of {len(values)} value(s) not there yet"
                still.append((zone, server, name, values))
        pending = still
        if not pending:
            return time.monotonic() - start
        if time.monotonic() + delay > deadline:
            zone, server, name, _ = pending[0]
            raise SolverError(
                f"zone {zone}: server {server} does not answer {name} TXT with the {what} "
                f"after {time.monotonic() - start:.1f} s ({last_problem})"
            )
        time.sleep(delay)
        delay = min(_POLL_MAX, delay * 2)


# --- the solver ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    zone: DnsZoneConfig
    name: str
    value: str


class Dns01Solver(Solver):
    """dns-01 through the configured `[[dns]]` zones; see the module docstring."""

    challenge_type = "dns-01"

    def __init__(self, zones: Sequence[DnsZoneConfig], storage: Storage) -> None:
        self.zones = tuple(zones)
        self.storage = storage

    def _records(self, tasks: Sequence[ChallengeTask]) -> list[_Record]:
        out: list[_Record] = []
        for t in tasks:
            zone = zone_for(t.domain, self.zones)
            if zone is None:
                # config.py refuses this at load time; the CA may still name an unexpected one.
                raise SolverError(f"no [[dns]] zone holds {t.name}")
            out.append(_Record(zone, acme_record_name(t.domain), t.validation))
        return out

    @staticmethod
    def _by_zone(records: Iterable[_Record]) -> dict[str, list[_Record]]:
        grouped: dict[str, list[_Record]] = {}
        for r in records:
            grouped.setdefault(r.zone.zone, []).append(r)
        return grouped

    @staticmethod
    def _journal_key(cert_name: str, records: Sequence[_Record]) -> str:
        # Derived from the values (unique per challenge): present and cleanup agree on it.
        digest = hashlib.sha256("\n".join(sorted(r.value for r in records)).encode())
        return layout.dns_pending_key(cert_name, digest.hexdigest()[:16])

    def present(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        records = self._records(tasks)
        if not records:
            return
        key = self._journal_key(cert_name, records)
        entry = {
            "certificate": cert_name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "created": time.time(),
            "records": [{"zone": r.zone.zone, "name": r.name, "value": r.value} for r in records],
        }
        # Journal first: a crash during or after the update still leaves a trace to clean.
        self.storage.store(key, (json.dumps(entry, indent=2) + "\n").encode())
        grouped = self._by_zone(records)
        for recs in grouped.values():
            publisher_for(recs[0].zone).add([(r.name, r.value) for r in recs])
        wanted: dict[str, list[tuple[Listen, str, set[str]]]] = {}
        timeout = 0.0
        for zname, recs in grouped.items():
            zone = recs[0].zone
            timeout = max(timeout, zone.propagation_timeout)
            values: dict[str, set[str]] = {}
            for r in recs:
                values.setdefault(r.name, set()).add(r.value)
            wanted[zname] = [
                (server, name, vals)
                for server in authoritative_servers(zone)
                for name, vals in values.items()
            ]
        waited = wait_visible(wanted, timeout, "challenge value")
        log.info(
            "certificate %s: %d TXT record(s) in zone(s) %s visible at every authoritative "
            "server after %.2f s",
            cert_name, len(records), ", ".join(sorted(grouped)), waited,
        )  # fmt: skip

    def cleanup(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        try:
            records = self._records(tasks)
        except SolverError:
            return
        if records and self._remove(cert_name, records):
            self.storage.delete(self._journal_key(cert_name, records))

    def _remove(self, cert_name: str, records: Sequence[_Record]) -> bool:
        ok = True
        for zname, recs in self._by_zone(records).items():
            try:
                publisher_for(recs[0].zone).remove([(r.name, r.value) for r in recs])
            except SolverError as e:
                ok = False
                log.warning(
                    "certificate %s: could not remove TXT record(s) in zone %s (retried at "
                    "the next start): %s", cert_name, zname, e,
                )  # fmt: skip
        return ok

    def recover(self) -> None:
        try:
            keys = self.storage.list(JOURNAL_PREFIX)
        except (OSError, StorageKeyError) as e:
            log.warning("cannot list the dns-01 journal: %s", e)
            return
        for key in keys:
            try:
                entry = json.loads(self.storage.load(key))
            except (OSError, ValueError) as e:
                log.warning("dns-01 journal entry %s is unreadable (%s): left in place", key, e)
                continue
            if _still_running(entry):
                continue
            by_name = {z.zone: z for z in self.zones}
            records: list[_Record] = []
            unknown: set[str] = set()
            for r in entry.get("records", []):
                zone = by_name.get(str(r.get("zone")))
                if zone is None:
                    unknown.add(str(r.get("zone")))
                    continue
                records.append(_Record(zone, str(r["name"]), str(r["value"])))
            if unknown:
                log.warning(
                    "dns-01 journal entry %s names zone(s) no longer configured (%s): "
                    "remove those records by hand",
                    key, ", ".join(sorted(unknown)),
                )  # fmt: skip
            cert = str(entry.get("certificate", "?"))
            if self._remove(cert, records):
                log.info(
                    "certificate %s: removed %d leftover TXT record(s) of an order that "
                    "did not finish (%s)", cert, len(records), key,
                )  # fmt: skip
                if not unknown:
                    self.storage.delete(key)


def _still_running(entry: dict[str, object]) -> bool:
    """True when the process that wrote `entry` may still be working on its order."""
    created = entry.get("created")
    if not isinstance(created, int | float) or time.time() - created > JOURNAL_MAX_AGE:
        return False
    if entry.get("host") != socket.gethostname():
        return True  # another node's order: its own next start cleans it
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # our own pid: an earlier life of this process id, or a bug
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- dns-persist-01 --------------------------------------------------------------------


def persist_record_name(name: str) -> str:
    """`_validation-persist.<name>.` for a certificate name (the wildcard's base name)."""
    return f"_validation-persist.{name.removeprefix('*.').rstrip('.')}."


def persist_record_value(issuer_domain: str, account_uri: str, wildcard: bool) -> str:
    """The TXT value dns-persist-01 asks for: `<issuer-domain-name>; accounturi=<uri>`,
    plus `; policy=wildcard` when the record must also authorize wildcard names."""
    value = f"{issuer_domain}; accounturi={account_uri}"
    return value + "; policy=wildcard" if wildcard else value


def parse_persist_value(value: str) -> tuple[str, dict[str, str]]:
    """(issuer-domain-name, {lower-cased tag: value}) of a dns-persist-01 TXT value."""
    issuer, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for part in rest.split(";"):
        tag, sep, val = part.strip().partition("=")
        if sep:
            params[tag.strip().lower()] = val.strip()
    return issuer.strip(), params


def check_persist_record(
    servers: Sequence[Listen],
    name: str,
    issuer_domains: Sequence[str],
    account_uri: str,
    wildcard: bool,
) -> str | None:
    """None when every server answers a `_validation-persist` record for `name` that the CA
    would accept for this account; else what is missing or wrong."""
    rname = persist_record_name(name)
    for server in servers:
        try:
            values = query_txt(server, rname)
        except (dns.exception.DNSException, OSError) as e:
            return f"cannot query {rname} TXT at {server}: {type(e).__name__}"
        if not values:
            return f"{rname} TXT is missing at {server}"
        problems: list[str] = []
        for v in values:
            issuer, params = parse_persist_value(v)
            if issuer_domains and issuer not in issuer_domains:
                continue
            if params.get("accounturi") != account_uri:
                problems.append(f"accounturi is {params.get('accounturi')!r}, not {account_uri!r}")
            elif wildcard and params.get("policy", "").lower() != "wildcard":
                problems.append("it lacks policy=wildcard, needed for the wildcard name")
            else:
                break
        else:
            if problems:
                return f"{rname} TXT at {server} is wrong: {'; '.join(problems)}"
            return (
                f"{rname} TXT at {server} names no issuer of this CA ({', '.join(issuer_domains)})"
            )
    return None
