"""Command line: `haproxy-acme-agent SUBCOMMAND -c CONFIG ...`.

Exit codes: 0 success (for `renew`: everything renewed or nothing due),
1 a certificate failed or an operation failed, 2 invalid configuration or
usage (the message names the file and key; nothing is written).

Adding a subcommand: write `def _args_x(p: argparse.ArgumentParser) -> None`
(its options; `-c/--config` is added for you) and `def cmd_x(args) -> int`,
then add one line to `COMMANDS`: `"x": Command("help text", _args_x, cmd_x)`.
A handler may raise `ConfigError` and gets exit code 2 with the message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, fleet_join, haproxy_config, importer, keys, permissions
from agent.config import DEFAULT_CONFIG_PATH, CertificateConfig, Config, ConfigError, load_config

if TYPE_CHECKING:
    from agent.challenges import ChallengeRegistry

log = logging.getLogger("agent.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


@dataclass(frozen=True)
class Command:
    """A subcommand: help line, argument setup, handler returning the exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    needs_config: bool = True


def load(args: argparse.Namespace) -> Config:
    """The config named by -c (raises ConfigError -> exit 2)."""
    return load_config(args.config)


def _select_one(config: Config, name: str) -> CertificateConfig:
    """The one certificate `name` (a key's NAME.KIND for a dual certificate)."""
    found = _select(config, [name])
    if len(found) != 1:
        raise ConfigError(
            config.path,
            "certificates",
            f"{name!r} is a certificate with one key per type: name one of its keys "
            f"({', '.join(c.name for c in found)})",
        )
    return found[0]


def _select(config: Config, names: Sequence[str]) -> list[CertificateConfig]:
    """The named certificates (all when `names` is empty); unknown names -> ConfigError."""
    if not names:
        return list(config.certificates)
    known = {c.name: c for c in config.certificates}
    # A dual certificate is named by its config name (all its keys) or a key's NAME.KIND.
    groups = {c.group for c in config.certificates if c.group}
    unknown = [n for n in names if n not in known and n not in groups]
    if unknown:
        raise ConfigError(
            config.path,
            "certificates",
            f"no certificate named {', '.join(map(repr, unknown))} "
            f"(configured: {', '.join(dict.fromkeys(c.label for c in known.values())) or 'none'})",
        )
    return [known[n] for n in config.expand_names(list(dict.fromkeys(names)))]


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _stable_key(cert: CertificateConfig, fleet_node: str | None) -> keys.PrivateKey:
    """The certificate's key; with generate_key a missing key is created now (once,
    0600), and on a fleet node that is said as the renewer says it."""
    from agent.renewal import stable_key

    return stable_key(cert, fleet_node)


def _fleet_node(config: Config) -> str | None:
    return config.fleet.node if config.fleet is not None else None


# --- renew -----------------------------------------------------------------------------


def _args_renew(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="certificates to renew (default: all)")
    p.add_argument("--force", action="store_true", help="renew even if not due")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only report what would be renewed and why; contacts no CA, writes nothing",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only renewals and failures")


def cmd_renew(args: argparse.Namespace) -> int:
    """Renew due certificates, serving the SPOE agent on [spoa] listen while orders run."""
    from agent import wiring

    config = load(args)
    _select(config, args.names)
    permissions.startup_checks(config)  # as run and check-config; PermissionsError -> exit 2
    if not args.dry_run:
        handed = _renew_through_daemon(config, args)
        if handed is not None:
            return handed
    # [fleet]: the registry runs a mirror thread; it ends with this command on
    # every path (an in-process caller must not be left with it running).
    with wiring.make_registry(config) as registry:
        return _renew_here(config, args, registry)


def _renew_here(config: Config, args: argparse.Namespace, registry: ChallengeRegistry) -> int:
    """`renew` without a daemon to hand it to: order here, serving challenges from `registry`."""
    from agent import challenge_map, wiring
    from agent.renewal import prepare_state, renew_certificates

    # answer = "map": HAProxy answers from its map; no SPOA needed for this run.
    map_registry = wiring.make_map_registry(config, registry)
    if map_registry is not None and not args.dry_run:
        challenge_map.startup_check(config)

    @contextlib.contextmanager
    def serve() -> Iterator[object]:
        from agent.spoa import SpoaThread, door_settings

        listen = config.spoa.listen
        try:
            thread = SpoaThread(registry, listen.host, listen.port, **door_settings(config.spoa))
            thread.start()
        except OSError as e:
            raise OSError(
                e.errno, f"{e.strerror or e} (is the daemon running? it renews by itself)"
            ) from e
        try:
            # HAProxy marked the agent DOWN while no renew ran: tell it we are back.
            from agent.agent_health import mark_agent_up

            if config.haproxy.runtime_api:
                mark_agent_up(config.haproxy.runtime_api, listen, config.haproxy.timeout)
            elif thread.wait_for_haproxy(HAPROXY_FIND_AGENT_TIMEOUT):
                log.info("HAProxy's health checks found the SPOE agent")
            else:
                log.warning(
                    "HAProxy did not health-check the SPOE agent within %.0f s (no [haproxy] "
                    "runtime_api to tell it directly): if it marked the agent DOWN, "
                    "validations fail until its checks see the agent again",
                    HAPROXY_FIND_AGENT_TIMEOUT,
                )
            yield thread
        finally:
            thread.stop()

    from agent.deploy import ReloadError, RenewalDeployHook

    # Every installed certificate is written to [haproxy] cert_dir and pushed
    # through the runtime API (or, without one, picked up by one reload).
    hook = RenewalDeployHook(config)
    # A forced certificate that a run we wait for installs after this moment
    # is not ordered again (four concurrent `renew --force` order it once).
    started_at = time.time()
    with _one_renew_at_a_time(config, args.dry_run) as got_it:
        if not got_it:
            # Overlapping cron runs: the other run renews (and reports) what is due.
            print(
                "renew: another `renew` run is in progress; nothing done by this one",
                file=sys.stderr,
            )
            return EXIT_OK
        if not args.dry_run:
            # Temp files, half-written generations and the old flat layout a
            # kill or an older version left behind; then our temp files in cert_dir.
            prepare_state(config)
        results = renew_certificates(
            config,
            args.names or None,
            args.force,
            args.dry_run,
            registry if map_registry is None else map_registry,
            on_installed=hook,
            serve_challenges=serve if map_registry is None else None,
            started_at=started_at,
        )
    failed = _print_results(
        [(r.name, r.status, r.reason, r.serial, r.not_after) for r in results], args.quiet
    )
    try:
        hook.finish()
    except ReloadError as e:
        print(f"error: {e}", file=sys.stderr)
        failed = True
    return EXIT_FAILED if failed else EXIT_OK


@contextlib.contextmanager
def _one_renew_at_a_time(config: Config, dry_run: bool) -> Iterator[bool]:
    """Hold the state dir's "renew-command" lock (two runs would fight over the SPOA port).

    Waits up to acme.timeout seconds; yields False when another run still holds
    it. A dry run writes nothing, so it takes no lock.
    """
    if dry_run:
        yield True
        return
    from agent.layout import RENEW_COMMAND_LOCK
    from agent.storage import FileStorage, LockTimeout

    storage = FileStorage(config.state_dir)
    try:
        # A lease renewed from a thread while we run: a killed run stops
        # blocking the next one when its lease ends (at once on this host).
        held = storage.locked(RENEW_COMMAND_LOCK, timeout=0)
        held.__enter__()
    except LockTimeout:
        owner = storage.lock_owner(RENEW_COMMAND_LOCK)
        who = f" ({owner.host} pid {owner.pid})" if owner else ""
        print(f"renew: waiting for another `renew` run{who} to finish", file=sys.stderr)
        sys.stderr.flush()
        try:
            held = storage.locked(RENEW_COMMAND_LOCK, timeout=config.acme.timeout)
            held.__enter__()
        except LockTimeout:
            yield False
            return
    try:
        yield True
    finally:
        held.__exit__(None, None, None)


# Without a runtime API, `renew` waits this long (seconds) for HAProxy's health
# checks to mark the freshly started SPOE agent UP: the shipped config checks
# a DOWN agent every second ("downinter 1s") and needs 2 good checks.
HAPROXY_FIND_AGENT_TIMEOUT = 15.0


def _print_results(
    rows: Sequence[tuple[str, str, str, str | None, float | None]], quiet: bool
) -> bool:
    """Print one line per certificate; True if any failed."""
    failed = False
    for name, status, reason, serial, not_after in rows:
        failed |= status == "failed"
        if quiet and status in ("not-due", "dry-run"):
            continue
        line = f"{name}: {status}: {reason}"
        if status == "renewed":
            line += f" (serial {serial}, valid until {_fmt_time(not_after)})"
        print(line, file=sys.stderr if status == "failed" else sys.stdout)
    return failed


def _renew_through_daemon(config: Config, args: argparse.Namespace) -> int | None:
    """Hand the renewal to a running daemon (it owns the SPOA port); None if none runs."""
    from agent import control

    path = config.daemon.control_socket
    message = {"cmd": "renew", "names": list(args.names), "force": bool(args.force)}
    try:
        reply = control.request(path, message, timeout=config.acme.timeout * 4 + 300)
    except control.ControlUnavailable:
        return None
    except (OSError, ValueError) as e:
        print(f"error: the daemon at {path} did not answer: {e}", file=sys.stderr)
        return EXIT_FAILED
    if not reply.get("ok"):
        print(f"error: daemon: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    log.info("renewal handed to the running daemon (%s)", path)
    rows = [
        (r["name"], r["status"], r["reason"], r.get("serial"), r.get("not_after"))
        for r in reply.get("results", [])
    ]
    return EXIT_FAILED if _print_results(rows, args.quiet) else EXIT_OK


# --- run (the daemon) ------------------------------------------------------------------


def _args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="log format (default: [daemon] log_format, else text)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM: SPOA, renewals, HAProxy deploys, metrics."""
    from pathlib import Path

    from agent.daemon import run_daemon

    return run_daemon(Path(args.config), args.log_format, verbose=args.verbose)


# --- status ----------------------------------------------------------------------------


def _args_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_status(args: argparse.Namespace) -> int:
    from agent.renewal import certificate_status, prepare_state

    config = load(args)
    now = time.time()
    # Repair what a crash left (never waiting on a renewal in progress); the
    # bundles in cert_dir are left to `run` and `renew`, which deploy them.
    storage = prepare_state(config, bundles=False, lock_timeout=0.2)
    rows = certificate_status(config, now, storage)
    for row in rows:
        row["haproxy"] = []
    if config.haproxy.runtime_api:
        by_name = {row["name"]: row for row in rows}
        for entry in served_serials(config):
            by_name[entry["certificate"]]["haproxy"].append(entry)
    _add_dns_persist_status(config, rows)
    nodes = _fleet_nodes(config)
    if nodes is not None:
        _add_node_certificates(nodes, {row["name"]: row["serial"] for row in rows})
        _add_switch_holds(config, storage, rows, nodes, now)
    if args.json:
        # Without [fleet] the list of certificates, as always; with it, an object
        # that also lists the fleet's nodes.
        doc: object = rows if nodes is None else {"certificates": rows, "nodes": nodes}
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    for node in nodes or []:
        if node.get("error"):
            print(f"fleet: {node['error']}")
            continue
        seen = _fmt_time(node["seen"]) if node.get("seen") else "-"
        print(f"node {node['node']}: {'alive' if node['alive'] else 'DEAD'} (last beat {seen})")
        for name, c in node["certificates"].items():
            if c["key_mismatch"]:
                state = "KEY MISMATCH: refuses the stored certificate (its key file differs)"
            elif c["in_sync"] is None:
                state = "unknown (node dead)" if not node["alive"] else "nothing stored"
            elif c["in_sync"]:
                state = f"serves {c['served_serial']} (the stored serial)"
            else:
                state = f"STALE: serves {c['served_serial'] or 'nothing'}, "
                state += f"stored {c['stored_serial']}"
            print(f"  {name}: {state}")
    if not rows:
        print("no certificates configured")
    for row in rows:
        days = "-" if row["days_left"] is None else f"{row['days_left']:.1f}"
        due = "now" if row["next_renewal"] <= now else _fmt_time(row["next_renewal"])
        print(f"{row['name']}")
        print(f"  domains       {', '.join(row['domains'])}")
        print(f"  key pin       {row['key_pin'] or '(key not created yet)'}")
        kr = row.get("key_rollover") or {}
        if kr.get("next_key") or kr.get("requested") or kr.get("previous"):
            print(f"  key rollover  {kr['state']}: {kr['why']}")
            if kr.get("next_key"):
                print(f"  next key      {kr['next_key']} (pin {kr['next_pin']}, announced "
                      f"{_fmt_time(kr['announced_at'])})")  # fmt: skip
            for p in kr.get("previous", []):
                print(f"  previous key  {p['path']} (pin {p['pin']}, listed until "
                      f"{_fmt_time(p['until'])})")  # fmt: skip
            if kr.get("revocation_pending"):
                print(f"  revocation    serial {kr['revocation_pending']} pending (keyCompromise)")
        if kr.get("served_pinned") is False:
            print("  WARNING       the served key's pin was never announced")
        print(f"  stored serial {row['serial'] or '-'}")
        print(f"  not after     {_fmt_time(row['not_after'])}  ({days} days left)")
        print(f"  next renewal  {due}")
        print(f"  profile       {row['profile'] or '(the CA default)'}")
        if row["ari_window"]:
            w = row["ari_window"]
            print(
                f"  ARI window    {_fmt_time(w['start'])} .. {_fmt_time(w['end'])}"
                f" (next check {_fmt_time(w['next_check'])})"
            )
        if row["rate_limited_until"] and row["rate_limited_until"] > now:
            print(f"  rate limited  no new order before {_fmt_time(row['rate_limited_until'])}")
        result = row["last_result"] or "never attempted"
        if row["last_attempt"]:
            result += f" at {_fmt_time(row['last_attempt'])}"
        if row["last_error"]:
            result += f": {row['last_error']}"
        print(f"  last result   {result}")
        if row["serial"]:
            for inst, d in row["deployed"].items():
                if d["matches"]:
                    fact = f"serves the stored serial (confirmed {_fmt_time(d['at'])})"
                elif d["serial"] or d["error"]:
                    fact = f"NOT DEPLOYED: last confirmed {d['serial'] or 'unknown'}"
                    fact += f" at {_fmt_time(d['at'])}" + (f" ({d['error']})" if d["error"] else "")
                else:
                    fact = "NOT DEPLOYED: never confirmed"
                print(f"  deployed      {inst}: {fact}")
        for h in row["haproxy"]:
            if h["error"]:
                state = f"unknown: {h['error']}"
            else:
                state = "in sync" if h["in_sync"] else "STALE"
                state += f" (serves {h['served_serial'] or 'nothing'})"
            print(f"  haproxy       {h['instance']}: {state}")
        if "dns_persist" in row:
            problems = row["dns_persist"]["problems"]
            print(f"  dns-persist   {'; '.join(problems) if problems else 'record published'}")
    return EXIT_OK


def _add_dns_persist_status(config: Config, rows: list[dict[str, Any]]) -> None:
    """`dns_persist` ({ok, problems}) for dns-persist-01 certificates, read from DNS."""
    from agent.dns_persist import record_problems
    from agent.storage import FileStorage

    storage = FileStorage(config.state_dir)
    by_name = {row["name"]: row for row in rows}
    for cert in config.certificates:
        if cert.challenge == "dns-persist-01" and cert.name in by_name:
            problems = record_problems(config, cert, storage)
            by_name[cert.name]["dns_persist"] = {"ok": not problems, "problems": problems}


# --- dns-persist -----------------------------------------------------------------------


def _args_dns_persist(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="a certificate with challenge dns-persist-01")


def cmd_dns_persist(args: argparse.Namespace) -> int:
    """Print the `_validation-persist` TXT record(s) to publish once for certificate NAME."""
    from agent.challenges import MemoryChallengeRegistry
    from agent.dns_persist import records_for
    from agent.issuer import AcmeError, Issuer
    from agent.solvers import SolverError
    from agent.storage import FileStorage

    config = load(args)
    cert = _select_one(config, args.name)
    if cert.challenge != "dns-persist-01":
        raise ConfigError(
            config.path,
            "certificates",
            f"certificate {cert.name} uses challenge {cert.challenge}, not dns-persist-01",
        )
    storage = FileStorage(config.state_dir)
    issuer = Issuer(config.acme, storage, MemoryChallengeRegistry())
    try:
        records = records_for(config, cert, issuer, storage)
    except (AcmeError, SolverError) as e:
        print(f"{cert.name}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"; publish once in DNS for certificate {cert.name} (dns-persist-01):")
    for r in records:
        print(r.zone_file_line())
    return EXIT_OK


def _add_node_certificates(nodes: list[dict[str, Any]], stored: dict[str, str | None]) -> None:
    """Give every node row "certificates": {name: {served_serial, stored_serial,
    in_sync, key_mismatch, next_key_pin}} from its heartbeat (served serials as
    hex; in_sync None when unknown: a dead node, or nothing stored;
    next_key_pin: the pin of the next key file that node holds, None if none)."""
    for node in nodes:
        if node.get("error"):
            continue
        served = node.get("serials") or {}
        refused = set(node.get("key_mismatch") or [])
        reported = node.get("next_keys")
        held: dict[str, Any] = reported if isinstance(reported, dict) else {}
        certs: dict[str, Any] = {}
        for name, stored_serial in stored.items():
            serving = served.get(name) if node.get("alive") else None
            known = bool(node.get("alive")) and stored_serial is not None
            certs[name] = {
                "served_serial": serving,
                "stored_serial": stored_serial,
                "in_sync": (serving == stored_serial) if known else None,
                "key_mismatch": name in refused,
                "next_key_pin": held.get(name) if node.get("alive") else None,
            }
        node["certificates"] = certs


def _add_switch_holds(
    config: Config, storage: Any, rows: list[dict[str, Any]], nodes: list[dict[str, Any]],
    now: float,
) -> None:  # fmt: skip
    """[fleet] A due key switch that waits for nodes lacking the next key
    (agent.rollover.switch_hold) says so in its row: key_rollover "waiting" (None
    when it does not wait) and "why"."""
    from agent import rollover
    from agent.certstate import load_meta

    assert config.fleet is not None
    unread = next((n["error"] for n in nodes if n.get("error")), None)
    for row in rows:
        kr = row.get("key_rollover")
        if not kr or not kr.get("due"):
            continue
        cfg, meta = config.certificate(row["name"]), load_meta(storage, row["name"])
        ks = meta.keys if meta else None
        hold: str | None = None
        if rollover.gated_target(cfg, ks, now) is not None:
            hold = (
                f"key rollover waits: cannot read the fleet's nodes: {unread}"
                if unread is not None
                else rollover.switch_hold(cfg, ks, now, config.fleet.node, nodes)
            )
        kr["waiting"] = hold
        if hold is not None:
            kr["why"] = hold


def _fleet_nodes(config: Config) -> list[dict[str, Any]] | None:
    """The fleet's nodes (agent.fleet.list_nodes); None without [fleet]. Redis
    unreachable: one pseudo-row saying so, so `status` still shows the rest."""
    if config.fleet is None:
        return None
    import redis

    from agent.fleet import list_nodes, redis_client

    client = redis_client(config.fleet)
    try:
        return list_nodes(client, config.fleet.namespace)
    except (redis.RedisError, OSError) as e:
        return [{"node": None, "alive": None, "error": f"Redis unreachable: {e}"}]
    finally:
        client.close()


def served_serials(config: Config) -> list[dict[str, Any]]:
    """What each runtime API instance serves for each stored certificate (read-only)."""
    from agent import wiring
    from agent.deploy import BundleError, stored_targets

    deployer = wiring.make_deployer(config)
    try:
        targets = stored_targets(config)
    except (BundleError, OSError) as e:
        log.warning("cannot read the stored bundles: %s", e)
        return []
    # One timeout at most per unresponsive instance (Deployer.served).
    return [
        {
            "certificate": s.name,
            "instance": s.instance,
            "error": s.error,
            "in_sync": s.in_sync,
            "served_serial": None if s.served_serial is None else f"{s.served_serial:x}",
        }
        for s in deployer.served(targets)
    ]


# --- pins ------------------------------------------------------------------------------


def _args_pins(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="certificates (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--report-uri", metavar="URL", help="report-uri for the HPKP header")


def _key_entry(path: Path, key: keys.PrivateKey) -> dict[str, Any]:
    return {"path": str(path), "key_type": keys.describe_key(key),
            "pin": keys.spki_pin(key), "tlsa_311": keys.tlsa_311(key)}  # fmt: skip


def tlsa_rrset(domains: Sequence[str], hexes: Sequence[str], port: int = 443) -> list[str]:
    """TLSA 3 1 1 records (zone-file lines) for every domain and hash, in order.
    Wildcard names are left out: TLSA has no wildcard owner name for them."""
    seen = list(dict.fromkeys(hexes))
    return [f"_{port}._tcp.{d}. IN TLSA 3 1 1 {h}" for d in domains if not d.startswith("*.")
            for h in seen]  # fmt: skip


def pins_of(
    cert: CertificateConfig,
    report_uri: str | None = None,
    storage: Any | None = None,
    now: float | None = None,
    mates: Sequence[str] = (),
    fleet_node: str | None = None,
) -> dict[str, Any]:
    """Pins, HPKP header values and TLSA data for one certificate: the current,
    next (being announced), backup and previous keys. `mates`: the pins of the
    other keys of a dual certificate, current and next (served for the same
    names, so clients must accept them too: they join the header and the TLSA
    RRset). Creates a generate_key / generate_next_key key (a warning says so
    on fleet node `fleet_node`). With `storage` (what `pins` passes) the next key's
    first showing is recorded as its announcement (under the certificate's
    lock; never moved later) and the rollover state is read from there."""
    from agent import layout, rollover
    from agent.certstate import load_meta

    now = time.time() if now is None else now
    ks: rollover.KeyState | None = None
    served_pin: str | None = None
    if storage is not None:
        _stable_key(cert, fleet_node)  # generate_key: it exists before the next key is resolved
        if cert.next_key is not None or cert.generate_next_key:
            with storage.locked(layout.cert_lock(cert.name), timeout=30.0):
                rollover.record_shown(storage, cert, now)
                meta = load_meta(storage, cert.name)
        else:  # no rollover configured: read only (a state dir may not even exist)
            meta = load_meta(storage, cert.name) if storage.exists(layout.state_key(cert.name)) \
                or storage.exists(layout.current_key(cert.name)) else None  # fmt: skip
        ks = meta.keys if meta else None
        served_pin = meta.key_pin if meta else None
    current_path = rollover.current_key_path(cert, ks)
    key = (_stable_key(cert, fleet_node) if current_path == cert.key
           else keys.load_private_key(current_path))  # fmt: skip
    current = _key_entry(current_path, key)
    key_pin = current["pin"]
    nxt: dict[str, Any] | None = None
    if ks is not None and ks.next is not None:
        nxt = _key_entry(Path(ks.next.path), keys.load_private_key(Path(ks.next.path)))
        nxt["announced_at"] = ks.next.announced_at
        at = ks.next.announced_at
        nxt["switch_allowed_at"] = None if at is None else at + cert.announce_for
    next_pins = [nxt["pin"]] if nxt else []
    pair_pins = list(dict.fromkeys(p for p in mates if p != key_pin and p not in next_pins))
    backups = [
        p for p in cert.backup_pins if p != key_pin and p not in next_pins and p not in pair_pins
    ]
    pins = [key_pin, *pair_pins, *next_pins, *backups]
    previous = [
        {"path": p.path, "pin": p.pin, "tlsa_311": keys.pin_to_tlsa(p.pin), "until": p.until}
        for p in (ks.previous if ks else ()) if p.until > now
    ]  # fmt: skip
    header = keys.hpkp_report_only_header(pins, report_uri=report_uri)
    hexes = [keys.pin_to_tlsa(p) for p in pins]
    st = rollover.status_of(cert, ks, now)
    return {
        "name": cert.name,
        "key": str(current_path),
        "key_type": current["key_type"],
        "key_pin": key_pin,
        "backup_pins": backups,
        "pair_pins": pair_pins,
        "hpkp_report_only": header,
        "hpkp": header,
        "tlsa_311": current["tlsa_311"],
        "backup_tlsa_311": [keys.pin_to_tlsa(p) for p in backups],
        "current": current,
        "next": nxt,
        "previous": previous,
        "tlsa_rrset": tlsa_rrset(cert.domains, hexes),
        "rollover": {"state": st.state, "why": st.why, "allowed_at": st.allowed_at},
        "served_pin": served_pin,
    }


def cmd_pins(args: argparse.Namespace) -> int:
    from agent import wiring

    config = load(args)
    certs = _select(config, args.names)
    storage = wiring.make_storage(config)
    try:
        # A dual certificate's keys are served for the same names: each key's
        # header and TLSA RRset lists the other key types' keys too, their
        # current and (during a rollover) their next key, which this showing
        # announces like their own `pins` would.
        now = time.time()
        group_pins: dict[str, dict[str, list[str]]] = {}
        for group in dict.fromkeys(c.group for c in certs if c.group is not None):
            for v in config.pair(group):
                own = pins_of(v, None, storage, now, fleet_node=_fleet_node(config))
                group_pins.setdefault(group, {})[v.name] = [
                    own["key_pin"], *([own["next"]["pin"]] if own["next"] else [])
                ]
        out = []
        for c in certs:
            mates = [p for n, ps in group_pins.get(c.group or "", {}).items() if n != c.name
                     for p in ps]  # fmt: skip
            out.append(pins_of(c, args.report_uri, storage, now, mates=mates,
                               fleet_node=_fleet_node(config)))  # fmt: skip
    except keys.StableKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for item in out:
        print(f"{item['name']} ({item['key_type']}, {item['key']})")
        print(f"  pin-sha256 key     {item['key_pin']}")
        if item["next"]:
            n = item["next"]
            print(f"  pin-sha256 next    {n['pin']}  ({n['path']}, announced "
                  f"{_fmt_time(n['announced_at'])}, switch allowed from "
                  f"{_fmt_time(n['switch_allowed_at'])})")  # fmt: skip
        for pin in item["pair_pins"]:
            print(f"  pin-sha256 pair    {pin}  (another key type of this dual certificate: "
                  "its current or next key)")  # fmt: skip
        for pin in item["backup_pins"]:
            print(f"  pin-sha256 backup  {pin}")
        for p in item["previous"]:
            print(f"  pin-sha256 previous {p['pin']}  ({p['path']}; may be dropped from "
                  f"headers and DNS after {_fmt_time(p['until'])})")  # fmt: skip
        print(f"  Public-Key-Pins-Report-Only: {item['hpkp_report_only']}")
        print(f"  Public-Key-Pins: {item['hpkp']}")
        print(f"  TLSA 3 1 1 {item['tlsa_311']}  (key)")
        if item["next"]:
            print(f"  TLSA 3 1 1 {item['next']['tlsa_311']}  (next)")
        for tlsa in item["backup_tlsa_311"]:
            print(f"  TLSA 3 1 1 {tlsa}  (backup)")
        print("  TLSA RRset to publish:")
        for line in item["tlsa_rrset"]:
            print(f"    {line}")
        print(f"  rollover: {item['rollover']['state']}: {item['rollover']['why']}")
    return EXIT_OK


# --- keys rollover ----------------------------------------------------------------------


def _args_keys(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    r = sub.add_parser("rollover", help="switch a certificate to its next (or a backup) key",
                       description="Ask for a switch to the next key: done as soon as it has "
                       "been announced for announce_for (by the daemon, or by this command "
                       "now). With --now --to: an emergency switch to a backup key.")  # fmt: skip
    r.add_argument("-c", "--config", default=argparse.SUPPRESS,
                   help=f"config file (default {DEFAULT_CONFIG_PATH})")  # fmt: skip
    r.add_argument("name", metavar="NAME", help="certificate name")
    r.add_argument("--now", action="store_true", help="emergency: switch at once (needs --to)")
    r.add_argument("--to", metavar="BACKUP_KEY_PATH", help="the backup key to switch to")
    r.add_argument(
        "--revoke",
        action="store_true",
        help="revoke the old certificate (keyCompromise, signed with the old key)",
    )
    r.add_argument("--force-unannounced", action="store_true",
                   help="accept a --to key whose pin is not in backup_pins (pinning clients "
                   "will refuse it)")  # fmt: skip
    r.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)


def _rollover_targets(
    config: Config, name: str, to: str | None
) -> tuple[list[CertificateConfig], str | None]:
    """The certificates `keys rollover NAME` switches, or ([], why not).

    A single-key certificate: itself. A dual certificate's key `NAME.rsa`: that
    key type only. A dual certificate's name: scheduled, every key type that has
    a next key (next_key / generate_next_key); with `--to`, the key type of
    the backup key (an RSA backup replaces the RSA key)."""
    found = _select(config, [name])
    # `NAME.rsa`: that key type alone (_select gives the whole pair of a key's name).
    found = [c for c in found if c.name == name] or found
    if to is not None:
        try:
            described = keys.describe_key(keys.load_private_key(Path(to)))
        except keys.StableKeyError as e:
            return [], f"certificate {name}: --to: {e}"
        kind = "rsa" if described.startswith("RSA") else "ecdsa"  # what load_private_key accepts
        if found[0].group is None:
            return found, None
        same = [c for c in found if c.key_kind == kind]
        if not same:
            group = found[0].group
            mate = [c.name for c in config.pair(group) if c.key_kind == kind]
            where = (f"name {group} or {mate[0]}" if mate
                     else f"{group} has no {kind.upper()} key")  # fmt: skip
            return [], (
                f"certificate {name}: --to {to} is an {kind.upper()} key, but {name} is not "
                f"({where}): a backup key replaces a key of its own type"
            )
        return same, None
    if len(found) == 1:
        return found, None
    rolling = [c for c in found if c.next_key is not None or c.generate_next_key]
    if not rolling:
        return [], (
            f"certificate {name}: none of its keys has a next key (set next_key or "
            f"generate_next_key inside its `keys` entries in {config.path}, then run `pins`)"
        )
    return rolling, None


def cmd_keys(args: argparse.Namespace) -> int:
    """`keys rollover NAME [--now --to KEY [--revoke] [--force-unannounced]]`."""
    from contextlib import ExitStack

    from agent import layout, rollover, wiring
    from agent.certstate import load_meta
    from agent.storage import LockTimeout

    config = load(args)
    if (args.now or args.revoke or args.force_unannounced) and not args.to:
        print("error: --now, --revoke and --force-unannounced need --to BACKUP_KEY_PATH "
              "(a scheduled rollover goes to the next key)", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    if args.to and not args.now:
        print("error: --to needs --now (an emergency switch)", file=sys.stderr)
        return EXIT_CONFIG
    certs, why_not = _rollover_targets(config, args.name, args.to)
    if why_not is not None:
        print(f"error: {why_not}", file=sys.stderr)
        return EXIT_FAILED
    for cert in certs:
        if cert.csr is not None:
            print(f"error: certificate {cert.name}: a rollover needs CSRs the agent builds: "
                  f"remove csr from {config.path}", file=sys.stderr)  # fmt: skip
            return EXIT_CONFIG
    permissions.startup_checks(config)
    storage = wiring.make_storage(config)
    now = time.time()
    states: dict[str, rollover.KeyState] = {}
    try:
        with ExitStack() as stack:
            # Every key type's lock (sorted, as a pair renewal takes them), and
            # every request checked before the first is written: all or nothing.
            for cert in sorted(certs, key=lambda c: c.name):
                stack.enter_context(
                    storage.locked(layout.cert_lock(cert.name), timeout=config.acme.timeout)
                )
            requests: dict[str, rollover.Request] = {}
            for cert in certs:
                ks = rollover.prepare(storage, cert, now, create=False)
                meta = load_meta(storage, cert.name)
                current_pin = meta.key_pin if meta and meta.key_pin else None
                if args.now:
                    request, warnings = rollover.emergency_request(
                        cert, Path(args.to), current_pin, now,
                        revoke=args.revoke, force_unannounced=args.force_unannounced,
                    )  # fmt: skip
                    for w in warnings:
                        print(w, file=sys.stderr)
                else:
                    if ks.next is None:
                        print(f"error: certificate {cert.name}: no next key (set next_key or "
                              f"generate_next_key in {config.path}, then run `pins`)",
                              file=sys.stderr)  # fmt: skip
                        return EXIT_FAILED
                    request = rollover.Request(now)
                requests[cert.name] = request
            for cert in certs:
                states[cert.name] = rollover.record_request(storage, cert, requests[cert.name])
    except rollover.RolloverError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except LockTimeout:
        print(f"error: certificate {args.name}: busy (a renewal holds its lock); try again",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    due = False
    for cert in certs:
        st = rollover.status_of(cert, states[cert.name], now)
        what = "requested" if not args.now else "to " + args.to
        print(f"{cert.name}: rollover {what}: {st.why}")
        due |= st.due
    # A dual certificate's keys renew as a pair: naming one renews both.
    names = [c.name for c in certs]
    if not due:
        # A running daemon reschedules the certificate now (it wakes when the
        # switch is allowed); without one, the next `renew` switches.
        args.names, args.force, args.quiet = names, False, True
        handed = _renew_through_daemon(config, args)
        return EXIT_OK if handed is None else handed
    args.names, args.force, args.dry_run = names, False, False
    args.quiet = getattr(args, "quiet", False)
    return cmd_renew(args)


# --- csr -------------------------------------------------------------------------------


def _args_csr(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="certificate name")


def cmd_csr(args: argparse.Namespace) -> int:
    config = load(args)
    cert = _select_one(config, args.name)
    try:
        if cert.csr is not None:
            pem = keys.csr_pem(keys.load_csr(cert.csr))
        else:
            key = _stable_key(cert, _fleet_node(config))
            pem = keys.csr_pem(keys.build_csr(key, cert.domains))
    except (keys.StableKeyError, keys.CSRError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(pem.decode())
    return EXIT_OK


# --- check-config ----------------------------------------------------------------------


def _args_none(p: argparse.ArgumentParser) -> None:
    pass


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and run the start-up checks of `run` (permissions, state_dir).

    Exit 2 for anything `run` would refuse (the systemd unit must not restart-loop on a
    config check-config passed); writes nothing."""
    config = load(args)
    permissions.startup_checks(config)
    from agent import challenge_map

    challenge_map.startup_check(config)  # map mode: as `run` (only reachable instances)
    names = ", ".join(c.name for c in config.certificates) or "none"
    print(f"{config.path}: OK ({len(config.certificates)} certificates: {names})")
    return EXIT_OK


# --- wiring ----------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "run": Command("run the agent: SPOA, renewals, HAProxy deploys, metrics", _args_run, cmd_run),
    "renew": Command("renew due certificates (cron-safe)", _args_renew, cmd_renew),
    "status": Command("show certificates and when they renew", _args_status, cmd_status),
    "pins": Command("print SPKI pins, HPKP header and TLSA 3 1 1 data", _args_pins, cmd_pins),
    "csr": Command("print the CSR for a certificate (PEM)", _args_csr, cmd_csr),
    "keys": Command(
        "key lifecycle: `keys rollover NAME` (see docs/pinning.md)", _args_keys, cmd_keys
    ),
    "check-config": Command("validate the configuration", _args_none, cmd_check_config),
    "dns-persist": Command(
        "print the dns-persist-01 TXT record(s) to publish once for a certificate",
        _args_dns_persist,
        cmd_dns_persist,
    ),
    "haproxy-config": Command(
        "print the HAProxy configuration matching the config",
        haproxy_config.add_arguments,
        haproxy_config.run,
    ),
    "import": Command(
        "adopt certbot + scripts site directories (key, CSR, certificate) without re-issuing",
        importer.add_arguments,
        importer.run,
    ),
    "fleet-join": Command(
        "copy this node's certificates and ACME account into the fleet's Redis ([fleet])",
        fleet_join.add_arguments,
        fleet_join.run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="haproxy-acme-agent",
        description="ACME certificates for HAProxy from stable keys.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.needs_config:
            p.add_argument(
                "-c",
                "--config",
                default=str(DEFAULT_CONFIG_PATH),
                help=f"config file (default {DEFAULT_CONFIG_PATH})",
            )
        p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
        command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(e.code) if isinstance(e.code, int) else EXIT_CONFIG
    from agent.logs import setup_logging

    setup_logging("text", logging.INFO if args.verbose else logging.WARNING)
    try:
        return COMMANDS[args.command].run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except permissions.PermissionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
