"""`haproxy-acme-agent fleet-join`: move a single node's certificates and ACME account
into the fleet's Redis, so the node joins a fleet without re-issuing anything.

A single node keeps everything in its state directory (`FileStorage`); with
`[fleet]` the same keys live in Redis (`RedisStorage`). `join(config, source)`
copies, from the file store at `source` (default: the config's `state_dir`):

- per configured certificate, its current generation (cert, chain, fullchain,
  meta.json, exactly as stored: same generation id, same serial), then its
  state.json without the deployed facts (those name this node's HAProxy
  instances; every node verifies its own again), then the `current` pointer,
  last, so another node never sees a pointer to a half-copied generation.
  This runs under the certificate's lock in Redis, and is skipped when the
  fleet already holds that generation or a certificate that expires as late
  or later (another node joined first with a newer one): a second run changes
  nothing, and an older node cannot roll the fleet back;
- the ACME account of each CA (`accounts/<ca>/...`, the key encrypted with the
  fleet secret), under that account's lock, unless the fleet already has an
  account for that CA: then the fleet's is kept and this node's left unused.

Checked first, all or nothing: every certificate to copy must be a complete,
readable generation whose leaf public key is the node's configured key (the
key file every node of the fleet holds); otherwise nothing is written and the
error names the certificate and the file. Private keys of certificates are
never copied (they are never in storage); only the account key is, encrypted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent import keys, layout, wiring
from agent.certstate import (
    CertState,
    Generation,
    GenerationError,
    load_current,
    load_state,
    read_current,
    repair,
    save_state,
    switch_generation,
)
from agent.config import Config, ConfigError, load_config
from agent.storage import FileStorage, Storage

ACCOUNTS = "accounts"
LOCK_TIMEOUT = 30.0  # s to wait for a certificate's lock in Redis (a renewal may hold it)


class JoinError(Exception):
    """A certificate or account that cannot be moved; names the certificate and the file."""


@dataclass
class JoinReport:
    copied: list[str] = field(default_factory=list)  # "www: serial ab12 (generation ...)"
    skipped: list[str] = field(default_factory=list)  # "www: the fleet already holds ..."
    accounts: list[str] = field(default_factory=list)  # "accounts/x: copied" / "kept"


def _spki(der_key: object) -> bytes:
    return der_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checked(config: Config, source: Storage) -> dict[str, Generation]:
    """The current generation of every configured certificate the node holds, checked."""
    found: dict[str, Generation] = {}
    for cfg in config.certificates:
        gen_id = read_current(source, cfg.name)
        if gen_id is None:
            continue
        try:
            gen = load_current(source, cfg.name)
        except GenerationError as e:
            raise JoinError(str(e)) from None
        if gen is None:
            raise JoinError(
                f"certificate {cfg.name}: generation {gen_id} in {source} is damaged or "
                "incomplete (run `haproxy-acme-agent status` without [fleet] to repair it)"
            )
        try:
            key = keys.load_private_key(cfg.key)
        except (OSError, keys.StableKeyError) as e:
            raise JoinError(f"certificate {cfg.name}: key {cfg.key}: {e}") from None
        if _spki(key.public_key()) != _spki(gen.leaf.public_key()):
            raise JoinError(
                f"certificate {cfg.name}: the stored certificate (serial {gen.meta.serial}) "
                f"is not for the key {cfg.key}: every node needs the certificate's key"
            )
        found[cfg.name] = gen
    return found


def _fleet_keeps(theirs: Generation | None, ours: Generation) -> bool:
    """The fleet's current generation stays: it is ours already, or expires as late."""
    if theirs is None:
        return False
    return theirs.id == ours.id or theirs.leaf.not_valid_after_utc >= ours.leaf.not_valid_after_utc


def _copy_certificate(
    target: Storage, name: str, gen: Generation, meta_json: bytes, state: CertState
) -> str | None:
    """Copy one generation under the certificate's lock (meta.json exactly as stored);
    None when the fleet keeps its own, else what was copied."""
    with target.locked(layout.cert_lock(name), timeout=LOCK_TIMEOUT):
        if _fleet_keeps(load_current(target, name), gen):
            return None
        files = {
            layout.CERT: gen.cert_pem,
            layout.CHAIN: gen.chain_pem,
            layout.FULLCHAIN: gen.fullchain_pem,
            layout.META: meta_json,
        }
        for filename in layout.GENERATION_FILES:  # meta.json last: complete before it
            target.store(layout.generation_key(name, gen.id, filename), files[filename])
        # Deployed facts name this node's instances; every node verifies its own.
        save_state(target, name, CertState(
            last_attempt=state.last_attempt, retry_not_before=state.retry_not_before,
            ari=state.ari, replaces_failures=state.replaces_failures,
        ))  # fmt: skip
        switch_generation(target, name, gen.id)
    return f"{name}: serial {gen.meta.serial} (generation {gen.id})"


def _copy_accounts(source: Storage, target: Storage, report: JoinReport) -> None:
    by_ca: dict[str, list[str]] = {}
    for key in source.list(ACCOUNTS, recursive=True):
        parts = key.split("/")
        if len(parts) >= 3:
            by_ca.setdefault(parts[1], []).append(key)
    for slug, names in sorted(by_ca.items()):
        prefix = f"{ACCOUNTS}/{slug}"
        # The lock agent.issuer takes before it creates an account key.
        with target.locked(f"account-{slug}", timeout=LOCK_TIMEOUT):
            if target.list(prefix, recursive=True):
                report.accounts.append(f"{prefix}: the fleet has its own account; kept it")
                continue
            for key in sorted(names):
                data = source.load(key)
                secret = key.endswith(".key") or b"PRIVATE KEY" in data
                target.store(key, data, secret=secret)
            report.accounts.append(f"{prefix}: copied ({len(names)} keys)")


def join(
    config: Config, source_dir: Path | None = None, *, target: Storage | None = None,
    dry_run: bool = False,
) -> JoinReport:  # fmt: skip
    """Copy the node's certificates and accounts into the fleet (see the module doc)."""
    if config.fleet is None:
        raise ConfigError(config.path, "fleet", "fleet-join needs a [fleet] section")
    source = FileStorage(source_dir or config.state_dir)
    names = [c.name for c in config.certificates]
    if not dry_run:
        repair(source, names)  # a crash or an older layout: whole generations first
    generations = _checked(config, source)
    target = target or wiring.make_storage(config)
    report = JoinReport()
    for name in names:
        if name not in generations:
            report.skipped.append(f"{name}: nothing stored on this node")
    for name, gen in generations.items():
        if dry_run:
            theirs = load_current(target, name)
            if _fleet_keeps(theirs, gen):
                assert theirs is not None
                report.skipped.append(f"{name}: the fleet holds serial {theirs.meta.serial}")
            else:
                report.copied.append(f"{name}: would copy serial {gen.meta.serial}")
            continue
        meta_json = source.load(layout.generation_key(name, gen.id, layout.META))
        done = _copy_certificate(target, name, gen, meta_json, load_state(source, name))
        if done is None:
            theirs = load_current(target, name)
            held = theirs.meta.serial if theirs is not None else "-"
            report.skipped.append(
                f"{name}: the fleet already holds serial {held} (the same or newer); kept it"
            )
        else:
            report.copied.append(done)
    if not dry_run:
        _copy_accounts(source, target, report)
    return report


# --- `haproxy-acme-agent fleet-join` (registered in agent/cli.py) ---------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="source", type=Path, metavar="STATE_DIR",
        help="the single node's state directory (default: the config's state_dir)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="say what would be copied")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when everything is in the fleet, 1 when something cannot be moved
    (nothing written), 2 for a config without [fleet]."""
    from redis import RedisError  # fleet mode only: the embedded default needs no Redis

    config = load_config(Path(args.config))
    try:
        report = join(config, args.source, dry_run=args.dry_run)
    except JoinError as e:
        print(f"error: {e}; nothing was copied", file=sys.stderr)
        return 1
    except (OSError, RedisError) as e:
        print(f"error: {config.fleet.redis if config.fleet else 'Redis'}: {e}", file=sys.stderr)
        return 1
    for line in report.copied:
        print(("" if args.dry_run else "copied ") + line)
    for line in report.skipped:
        print(f"skipped {line}")
    for line in report.accounts:
        print(line)
    return 0
