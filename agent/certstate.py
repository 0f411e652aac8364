"""A certificate's stored state: immutable generations, the pointer, state.json, repair.

Layout: see `agent.layout`. The rules this module keeps:

- A generation (cert.pem, chain.pem, fullchain.pem, meta.json of ONE leaf) is
  written completely, each file atomically, meta.json last, BEFORE the
  `current` pointer is switched to it (`install_generation`). The pointer is
  one atomic store, so a reader that reads the pointer and then that
  generation's files sees one certificate, whenever a crash happened.
- The current and the previous generation are kept; older ones are pruned
  after a successful switch.
- state.json holds what changes without a new certificate (last attempt,
  rate-limit retry time, the ARI window keyed by its certificate id, and the
  deployed facts per HAProxy instance). It is only read-modify-written by
  `update_state`, which the caller runs under the certificate's lock
  (`agent.layout.cert_lock`).
- `repair` (at every start) removes temp files and unreferenced incomplete
  generations, and migrates the flat layout of older versions.

No private key is ever stored here.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent import ari, keys, layout, rollover
from agent.storage import LockLost, LockTimeout, Storage

log = logging.getLogger(__name__)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


class GenerationError(ValueError):
    """A generation that is incomplete or whose files describe different certificates."""


# --- values ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """The last renewal attempt: UNIX time, "success" or "failed", and the error text.

    `deployed`: True when the certificate was stored AND confirmed served by
    every HAProxy instance, False when storing worked but the deploy did not,
    None when the attempt did not get to a deploy (or there is no deployer).
    """

    time: float
    result: str
    error: str | None = None
    deployed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "result": self.result,
            "error": self.error,
            "deployed": self.deployed,
        }

    @classmethod
    def from_json(cls, la: Mapping[str, Any]) -> Attempt:
        d = la.get("deployed")
        return cls(
            float(la["time"]), str(la["result"]), la.get("error"), None if d is None else bool(d)
        )


@dataclass(frozen=True)
class Deployed:
    """A fact about one HAProxy instance ("disk" in reload mode): at UNIX time
    `at`, it was confirmed to serve leaf `serial` (lowercase hex); None with
    `error` when the last deploy could not tell (instance down, failed)."""

    serial: str | None
    at: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "at": self.at, "error": self.error}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Deployed:
        s = d.get("serial")
        return cls(None if s is None else str(s), float(d["at"]), d.get("error"))


@dataclass(frozen=True)
class CertState:
    """state.json: the mutable state of one certificate (see the module doc)."""

    last_attempt: Attempt | None = None
    retry_not_before: float | None = None  # from a rateLimited Retry-After (UNIX s)
    ari: ari.RenewalWindow | None = None  # keyed by its own cert_id
    deployed: Mapping[str, Deployed] = field(default_factory=dict)
    # Orders carrying `replaces` (RFC 9773) for the current leaf that the CA
    # refused; from `agent.renewal.REPLACES_MAX_FAILURES` on, orders go without.
    replaces_failures: int = 0
    # Key rollover state (agent/rollover.py); None: no next key ever seen.
    keys: rollover.KeyState | None = None

    def to_json(self, name: str) -> dict[str, Any]:
        return {
            "version": 1,
            "name": name,
            "last_attempt": self.last_attempt.to_json() if self.last_attempt else None,
            "retry_not_before": self.retry_not_before,
            "ari": self.ari.to_json() if self.ari else None,
            "deployed": {k: v.to_json() for k, v in sorted(self.deployed.items())},
            "replaces_failures": self.replaces_failures,
            "keys": self.keys.to_json() if self.keys else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CertState:
        la = data.get("last_attempt")
        rnb = data.get("retry_not_before")
        return cls(
            last_attempt=Attempt.from_json(la) if la else None,
            retry_not_before=None if rnb is None else float(rnb),
            ari=ari.RenewalWindow.from_json(data["ari"]) if data.get("ari") else None,
            deployed={
                str(k): Deployed.from_json(v) for k, v in (data.get("deployed") or {}).items()
            },
            replaces_failures=int(data.get("replaces_failures") or 0),
            keys=rollover.KeyState.from_json(data["keys"]) if data.get("keys") else None,
        )


@dataclass(frozen=True)
class CertMeta:
    """What we know about a certificate: its current generation merged with
    state.json (`load_meta`). Times: UNIX s, UTC; serial: lowercase hex."""

    name: str
    domains: tuple[str, ...] = ()
    serial: str | None = None
    not_before: float | None = None
    not_after: float | None = None
    key_pin: str | None = None
    installed_at: float | None = None
    ari: ari.RenewalWindow | None = None
    last_attempt: Attempt | None = None
    retry_not_before: float | None = None
    directory: str | None = None
    generation: str | None = None  # id of the current generation
    deployed: Mapping[str, Deployed] = field(default_factory=dict)
    profile: str | None = None  # the ACME profile it was ordered under (None: CA default)
    replaces_failures: int = 0  # from state.json (see CertState)
    # The fencing number of the lock hold that installed it, and the node that did
    # (None: installed without a fenced lock, e.g. by an older version or `import`).
    fence: int | None = None
    node: str | None = None
    # The key file this generation was ordered for (meta.json; None: older
    # versions, the configured key). The bundle is built from it.
    key_path: str | None = None
    keys: rollover.KeyState | None = None  # from state.json (see CertState)

    @property
    def installed(self) -> bool:
        return self.serial is not None and self.not_after is not None

    def state(self) -> CertState:
        return CertState(
            self.last_attempt,
            self.retry_not_before,
            self.ari,
            dict(self.deployed),
            self.replaces_failures,
            self.keys,
        )

    def to_json(self) -> dict[str, Any]:
        """The generation's meta.json (leaf facts only)."""
        return {
            "version": 2,
            "name": self.name,
            "generation": self.generation,
            "domains": list(self.domains),
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "key_pin": self.key_pin,
            "installed_at": self.installed_at,
            "directory": self.directory,
            "profile": self.profile,
            "fence": self.fence,
            "node": self.node,
            "key_path": self.key_path,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CertMeta:
        """Parse a generation's meta.json, or an old-layout meta.json (which also
        held the attempt, retry time and ARI window)."""
        old = CertState.from_json(data)
        return cls(
            name=str(data["name"]),
            domains=tuple(data.get("domains") or ()),
            serial=data.get("serial"),
            not_before=_opt_float(data.get("not_before")),
            not_after=_opt_float(data.get("not_after")),
            key_pin=data.get("key_pin"),
            installed_at=_opt_float(data.get("installed_at")),
            ari=old.ari,
            last_attempt=old.last_attempt,
            retry_not_before=old.retry_not_before,
            directory=data.get("directory"),
            generation=data.get("generation"),
            profile=data.get("profile"),
            fence=None if data.get("fence") is None else int(data["fence"]),
            node=None if data.get("node") is None else str(data["node"]),
            key_path=data.get("key_path"),
        )

    def with_state(self, state: CertState) -> CertMeta:
        return _evolve(
            self,
            last_attempt=state.last_attempt,
            retry_not_before=state.retry_not_before,
            ari=state.ari,
            deployed=dict(state.deployed),
            replaces_failures=state.replaces_failures,
            keys=state.keys,
        )


def _evolve(meta: CertMeta, **changes: Any) -> CertMeta:
    """`dataclasses.replace` for CertMeta without re-running the frozen
    `__init__` (20 guarded setattrs): the daemon's start makes two per
    certificate, and at 10,000 certificates replace() was 0.4 s of it.
    `changes` must name CertMeta fields (checked by the callers' tests)."""
    new = object.__new__(CertMeta)
    d = new.__dict__
    d.update(meta.__dict__)
    d.update(changes)
    return new


def _opt_float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


def meta_from_certificate(name: str, cert: x509.Certificate) -> CertMeta:
    """Metadata derived from a certificate alone."""
    return CertMeta(
        name=name,
        domains=tuple(keys.cert_domains(cert)),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        key_pin=keys.spki_pin(cert.public_key()),  # type: ignore[arg-type]
    )


def undeployed(
    meta: CertMeta | None, instances: Iterable[str], node: str | None = None
) -> list[str]:
    """The instances among `instances` not confirmed to serve `meta`'s stored serial;
    `node`: whose facts to read in a fleet (`layout.deployed_key`)."""
    if meta is None or not meta.installed:
        return []
    out = []
    for inst in instances:
        fact = meta.deployed.get(layout.deployed_key(node, inst))
        if fact is None or fact.serial != meta.serial:
            out.append(inst)
    return out


# --- reading -----------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One generation's files, read and checked to describe the same leaf."""

    id: str
    cert_pem: bytes
    chain_pem: bytes
    fullchain_pem: bytes
    meta: CertMeta

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def read_current(storage: Storage, name: str) -> str | None:
    """The id in the `current` pointer, or None (no certificate installed yet)."""
    try:
        raw = storage.load(layout.current_key(name)).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    return raw if layout.is_generation_id(raw) else None


def load_generation_meta(storage: Storage, name: str, gen_id: str) -> CertMeta:
    """A generation's meta.json; FileNotFoundError while incomplete, GenerationError if bad."""
    return _parse_generation_meta(
        name, gen_id, storage.load(layout.generation_key(name, gen_id, layout.META))
    )


def _parse_generation_meta(name: str, gen_id: str, raw: bytes) -> CertMeta:
    try:
        meta = CertMeta.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise GenerationError(f"certificate {name}: generation {gen_id}: bad meta.json: {e}") from e
    if meta.name != name or not meta.installed:
        raise GenerationError(f"certificate {name}: generation {gen_id}: meta.json is not its own")
    return _evolve(meta, generation=gen_id, ari=None, last_attempt=None, retry_not_before=None)


def read_currents(storage: Storage, names: Iterable[str]) -> dict[str, str | None]:
    """`read_current` of every name, in ONE `Storage.load_many` round."""
    names = list(names)
    raw = storage.load_many([layout.current_key(n) for n in names])
    out: dict[str, str | None] = {}
    for n in names:
        value = raw.get(layout.current_key(n))
        gen_id = None if value is None else value.decode("ascii", "replace").strip()
        out[n] = gen_id if gen_id is not None and layout.is_generation_id(gen_id) else None
    return out


def load_generation(storage: Storage, name: str, gen_id: str) -> Generation:
    """Read and cross-check a generation: FileNotFoundError if a file is missing,
    GenerationError if they do not describe the same leaf."""
    meta = load_generation_meta(storage, name, gen_id)
    cert_pem = storage.load(layout.generation_key(name, gen_id, layout.CERT))
    chain_pem = storage.load(layout.generation_key(name, gen_id, layout.CHAIN))
    fullchain_pem = storage.load(layout.generation_key(name, gen_id, layout.FULLCHAIN))
    return _checked_generation(name, gen_id, meta, cert_pem, chain_pem, fullchain_pem)


def load_generations(
    storage: Storage, wanted: Mapping[str, str]
) -> dict[str, Generation | FileNotFoundError | GenerationError]:
    """`load_generation` of every (name -> generation id) in `wanted`, every file
    in ONE `Storage.load_many` round: per name the Generation, or the error
    `load_generation` would raise (FileNotFoundError: a file is missing;
    GenerationError: they do not describe the same leaf), returned, not raised."""
    files = (layout.META, layout.CERT, layout.CHAIN, layout.FULLCHAIN)
    raw = storage.load_many(
        [layout.generation_key(n, g, f) for n, g in wanted.items() for f in files]
    )
    out: dict[str, Generation | FileNotFoundError | GenerationError] = {}
    for name, gen_id in wanted.items():
        got = [raw.get(layout.generation_key(name, gen_id, f)) for f in files]
        missing = [f for f, v in zip(files, got, strict=True) if v is None]
        if missing:
            out[name] = FileNotFoundError(
                f"certificate {name}: generation {gen_id}: no {', '.join(missing)}"
            )
            continue
        meta_raw, cert_pem, chain_pem, fullchain_pem = (v for v in got if v is not None)
        try:
            meta = _parse_generation_meta(name, gen_id, meta_raw)
            out[name] = _checked_generation(
                name, gen_id, meta, cert_pem, chain_pem, fullchain_pem
            )
        except GenerationError as e:
            out[name] = e
    return out


def _checked_generation(
    name: str, gen_id: str, meta: CertMeta, cert_pem: bytes, chain_pem: bytes,
    fullchain_pem: bytes,
) -> Generation:  # fmt: skip
    """The Generation of those files; GenerationError if they describe different leaves."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
        full = _parse_certs(fullchain_pem)
        chain = _parse_certs(chain_pem)
    except ValueError as e:
        raise GenerationError(f"certificate {name}: generation {gen_id}: {e}") from e
    if (
        not full
        or full[0] != leaf
        or format(leaf.serial_number, "x") != meta.serial
        or _pem(full[1:]) != _pem(chain)
    ):
        raise GenerationError(
            f"certificate {name}: generation {gen_id}: files describe different certificates"
        )
    return Generation(gen_id, cert_pem, chain_pem, fullchain_pem, meta)


def load_current(storage: Storage, name: str) -> Generation | None:
    """The current generation (checked), or None when none is installed or it is damaged."""
    gen_id = read_current(storage, name)
    if gen_id is None:
        return None
    try:
        return load_generation(storage, name, gen_id)
    except (FileNotFoundError, GenerationError) as e:
        log.warning("certificate %s: current generation %s unreadable: %s", name, gen_id, e)
        return None


def load_state(storage: Storage, name: str) -> CertState:
    """state.json (an empty state when missing; a damaged one is logged and ignored)."""
    try:
        raw = storage.load(layout.state_key(name))
    except FileNotFoundError:
        return CertState()
    return _parse_state(name, raw)


def _parse_state(name: str, raw: bytes | None) -> CertState:
    if raw is None:
        return CertState()
    try:
        return CertState.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("certificate %s: state.json is damaged (%s); starting afresh", name, e)
        return CertState()


def load_meta(storage: Storage, name: str) -> CertMeta | None:
    """The current generation's facts merged with state.json; None when neither exists."""
    return load_metas(storage, [name])[name]


def load_metas(storage: Storage, names: Iterable[str]) -> dict[str, CertMeta | None]:
    """`load_meta` of every name in `names`, in two `Storage.load_many` rounds
    (every state.json and pointer, then every current meta.json): the daemon
    reads 10,000 of them at start."""
    names = list(names)
    first = storage.load_many(
        [k for n in names for k in (layout.state_key(n), layout.current_key(n))]
    )
    gen_ids: dict[str, str] = {}
    for n in names:
        raw = first.get(layout.current_key(n))
        if raw is not None:
            gen_id = raw.decode("ascii", "replace").strip()
            if layout.is_generation_id(gen_id):
                gen_ids[n] = gen_id
    metas_raw = storage.load_many(
        [layout.generation_key(n, g, layout.META) for n, g in gen_ids.items()]
    )
    out: dict[str, CertMeta | None] = {}
    for n in names:
        state = _parse_state(n, first.get(layout.state_key(n)))
        meta: CertMeta | None = None
        current = gen_ids.get(n)
        if current is not None:
            try:
                meta_raw = metas_raw.get(layout.generation_key(n, current, layout.META))
                if meta_raw is None:
                    raise FileNotFoundError(f"no {layout.META}")
                meta = _parse_generation_meta(n, current, meta_raw)
            except (FileNotFoundError, GenerationError) as e:
                log.warning("certificate %s: current generation %s unreadable: %s", n, current, e)
        if meta is None:
            out[n] = None if state == CertState() else CertMeta(name=n).with_state(state)
        else:
            out[n] = meta.with_state(state)
    return out


# --- writing (callers hold layout.cert_lock(name)) -----------------------------------


def state_bytes(name: str, state: CertState) -> bytes:
    """state.json of `name` as stored."""
    return (json.dumps(state.to_json(name), indent=2, sort_keys=True) + "\n").encode()


def parse_state(name: str, raw: bytes | None) -> CertState:
    """state.json bytes (None: missing) as `load_state` reads them."""
    return _parse_state(name, raw)


def save_state(storage: Storage, name: str, state: CertState) -> None:
    storage.store(layout.state_key(name), state_bytes(name, state))


def update_state(
    storage: Storage, name: str, change: Callable[[CertState], CertState]
) -> CertState:
    """Read state.json, apply `change`, write it back. Run under the certificate's lock."""
    state = change(load_state(storage, name))
    save_state(storage, name, state)
    return state


def write_generation(
    storage: Storage,
    name: str,
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    installed_at: float,
    directory: str | None,
    profile: str | None = None,
    key_path: str | None = None,
    *,
    fence: int | None = None,
    node: str | None = None,
) -> CertMeta:
    """Write a complete new generation (meta.json last); the pointer is not moved.
    `key_path`: the key file the leaf was ordered for (the bundle is built from it);
    `fence` / `node`: recorded in meta.json (who installed it, under which hold)."""
    gen_id = layout.new_generation_id(installed_at, leaf.serial_number)
    meta = replace(
        meta_from_certificate(name, leaf),
        installed_at=installed_at,
        directory=directory,
        generation=gen_id,
        profile=profile,
        fence=fence,
        node=node,
        key_path=key_path,
    )
    files = {
        layout.CERT: _pem([leaf]),
        layout.CHAIN: _pem(chain),
        layout.FULLCHAIN: _pem([leaf, *chain]),
        layout.META: (json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n").encode(),
    }
    for filename in layout.GENERATION_FILES:  # meta.json last
        storage.store(layout.generation_key(name, gen_id, filename), files[filename])
    return meta


Commit = Callable[[dict[str, bytes]], None]


def switch_generation(
    storage: Storage, name: str, gen_id: str, commit: Commit | None = None
) -> None:
    """Point `current` at `gen_id` (one atomic store), then prune all but it and the previous.

    `commit(values)`, when given, makes that store instead (a fenced commit,
    `Storage.commit_fenced`): when it raises, nothing is switched or pruned."""
    previous = read_current(storage, name)
    values = {layout.current_key(name): layout.check_generation_id(gen_id).encode()}
    if commit is not None:
        commit(values)
    else:
        storage.store(*next(iter(values.items())))
    keep = {gen_id, previous}
    for old in generation_ids(storage, name):
        if old not in keep:
            storage.delete_all(layout.generation_prefix(name, old))


def install_generation(
    storage: Storage,
    name: str,
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    installed_at: float,
    directory: str | None,
    before_switch: Callable[[], None] | None = None,
    profile: str | None = None,
    key_path: str | None = None,
    *,
    fence: int | None = None,
    node: str | None = None,
    commit: Commit | None = None,
) -> CertMeta:
    """Write a generation and switch to it. `before_switch` runs between the two
    (e.g. a lease check that raises `LockLost`: then nothing is switched);
    `commit` makes the switch (see `switch_generation`). A generation written
    but not switched to is removed again (a refused commit leaves nothing).
    `key_path`: see `write_generation`."""
    meta = write_generation(
        storage, name, leaf, chain, installed_at, directory, profile, key_path,
        fence=fence, node=node,
    )  # fmt: skip
    assert meta.generation is not None
    try:
        if before_switch is not None:
            before_switch()
        switch_generation(storage, name, meta.generation, commit)
    except LockLost:
        if read_current(storage, name) != meta.generation:
            storage.delete_all(layout.generation_prefix(name, meta.generation))
        raise
    return meta


def generation_ids(storage: Storage, name: str) -> list[str]:
    """Ids of every generation directory of `name`, oldest first (complete or not)."""
    prefix = layout.generations_prefix(name) + "/"
    ids = [k[len(prefix) :] for k in storage.list(layout.generations_prefix(name))]
    return sorted(i for i in ids if layout.is_generation_id(i))


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _parse_certs(pem: bytes) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(b) for b in _PEM_CERT.findall(pem)]


# --- repair at start -----------------------------------------------------------------


@dataclass
class RepairReport:
    """What `repair` did (counts, for logs and tests)."""

    temp_files: int = 0
    incomplete_generations: int = 0
    migrated: list[str] = field(default_factory=list)
    repointed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # locked by a running renewal


def stored_names(storage: Storage) -> list[str]:
    """Names of every certificate that has keys in storage."""
    prefix = layout.CERTIFICATES + "/"
    return [k[len(prefix) :] for k in storage.list(layout.CERTIFICATES)]


def repair(
    storage: Storage,
    names: Iterable[str] = (),
    lock_timeout: float = 5.0,
    pinned: Mapping[str, str] | None = None,
) -> RepairReport:
    """Make the stored state whole again after a crash or an older version.

    For every certificate among `names` and those found in storage, under its
    lock (one held by a running renewal for `lock_timeout` s is skipped: that
    run owns the state): remove temp files; migrate the old flat layout;
    point `current` at the newest complete generation (one an install
    completed but did not switch to, or when it points nowhere valid); delete
    incomplete generations and all but the current and previous complete ones. Temp files
    elsewhere in storage (accounts, locks) older than a minute go too.

    `pinned` maps a certificate name to the generation a pair pointer says it
    serves (a dual certificate's key, `agent.pairs.pinned_generations`): a
    complete pinned generation at or after `current` becomes `current` (the
    pair's switch is rolled forward), and a newer generation than it is one
    half of a pair whose pointer was never written: deleted, not adopted.
    """
    pinned = pinned or {}
    report = RepairReport()
    # One listing of every key (cheap), then a lock and a closer look only
    # where something is off: a start with 10,000 certificates stays quick.
    all_keys, temps = storage.scan(layout.CERTIFICATES)
    with_temps = {k.split("/")[1] for k in temps if k.count("/") >= 2}
    by_name: dict[str, list[str]] = {}
    for key in all_keys:
        parts = key.split("/", 2)
        if len(parts) == 3:
            by_name.setdefault(parts[1], []).append(parts[2])
    every = sorted(set(names) | set(by_name))
    # The pointers of every certificate with generations, in one round.
    pointers = storage.load_many(
        [layout.current_key(n) for n in every if n not in with_temps and n in by_name]
    )
    for name in every:
        if (
            name not in with_temps
            and not _needs_repair(
                name, by_name.get(name, []), pointers.get(layout.current_key(name))
            )
            and (name not in pinned or read_current(storage, name) == pinned[name])
        ):
            continue
        try:
            with storage.locked(layout.cert_lock(name), timeout=lock_timeout):
                _repair_one(storage, name, report, pinned.get(name))
        except LockTimeout:
            report.skipped.append(name)
    for top in storage.list(""):
        if top != layout.CERTIFICATES:  # accounts, locks: few files
            report.temp_files += storage.remove_temporaries(top, older_than=60.0)
    if report.temp_files or report.incomplete_generations or report.migrated or report.repointed:
        log.info(
            "storage repaired: %d temp files removed, %d incomplete generations removed, "
            "migrated %s, repointed %s",
            report.temp_files, report.incomplete_generations,
            ", ".join(report.migrated) or "none", ", ".join(report.repointed) or "none",
        )  # fmt: skip
    return report


_LEGACY = frozenset(layout.LEGACY_FILES)


def _needs_repair(name: str, keys_below: Sequence[str], pointer: bytes | None) -> bool:
    """Cheap, from the keys below certificates/NAME (relative) and the raw
    `current` pointer (None: absent): old flat files, a generation without
    meta.json, or generations other than `current` and one older one."""
    gens: dict[str, set[str]] = {}
    for k in keys_below:
        if k in _LEGACY:
            return True
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == layout.GENERATIONS:
            gens.setdefault(parts[1], set()).add(parts[2])
    if not gens:
        return False
    if len(gens) > 2 or any(layout.META not in files for files in gens.values()):
        return True
    # Installs write the newest generation and then point at it; anything
    # else (a newer one not pointed to, no pointer) is a crash.
    current = None if pointer is None else pointer.decode("ascii", "replace").strip()
    return current != max(gens)


def _repair_one(
    storage: Storage, name: str, report: RepairReport, pinned: str | None = None
) -> None:
    report.temp_files += storage.remove_temporaries(layout.cert_prefix(name))
    if _migrate_legacy(storage, name):
        report.migrated.append(name)
    current = read_current(storage, name)
    complete: list[str] = []
    stored_fence = _fence_of(storage, name)
    for gen_id in generation_ids(storage, name):
        try:
            gen = load_generation(storage, name, gen_id)
        except (FileNotFoundError, GenerationError):
            if gen_id != current:
                storage.delete_all(layout.generation_prefix(name, gen_id))
                report.incomplete_generations += 1
            continue
        fence = gen.meta.fence
        if gen_id != current and fence is not None and stored_fence is not None and (
            fence < stored_fence
        ):
            # Written by a holder whose lease had run out (its commit was
            # refused, then it died): never adopted over the newer install.
            storage.delete_all(layout.generation_prefix(name, gen_id))
            report.incomplete_generations += 1
            continue
        complete.append(gen_id)
    if pinned is not None and pinned in complete and (current is None or pinned >= current):
        # One key of a dual certificate: its pair pointer decides (agent.pairs).
        if current != pinned:
            storage.store(layout.current_key(name), pinned.encode())
            update_state(storage, name, lambda s: replace(s, ari=None))
            report.repointed.append(name)
            current = pinned
        for gen_id in [g for g in complete if g > pinned]:
            storage.delete_all(layout.generation_prefix(name, gen_id))
            report.incomplete_generations += 1
        complete = [g for g in complete if g <= pinned]
    elif complete and (current not in complete or complete[-1] > current):
        # A kill after a generation was complete (meta.json is written last,
        # after the checks) but before the switch: adopt it rather than order
        # again. A damaged pointer or generation: the newest good one.
        storage.store(layout.current_key(name), complete[-1].encode())
        update_state(storage, name, lambda s: replace(s, ari=None))  # the old leaf's window
        report.repointed.append(name)
        if current is not None and current not in complete:
            storage.delete_all(layout.generation_prefix(name, current))
            report.incomplete_generations += 1
        current = complete[-1]
    # A kill between the pointer switch and the prune leaves a third one:
    # keep the current generation and the newest before it, as a switch does.
    older = [g for g in complete if g != current and (current is None or g < current)]
    keep = {current, *older[-1:]}
    for gen_id in complete:
        if gen_id not in keep:
            storage.delete_all(layout.generation_prefix(name, gen_id))


def _fence_of(storage: Storage, name: str) -> int | None:
    try:
        return int(storage.load(layout.fence_key(name)).strip())
    except (FileNotFoundError, ValueError):
        return None


def _consistent_chain(certs: list[x509.Certificate]) -> bool:
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            return False
    return True


def _migrate_legacy(storage: Storage, name: str) -> bool:
    """Turn the flat layout of older versions (maybe a mix left by a kill) into a generation.

    Candidates: fullchain.pem, bundle.pem, bundle.prev.pem (their certificate
    blocks; the key in a bundle is NOT carried over) and cert.pem + chain.pem.
    The newest leaf among those that parse and whose chain signs it wins;
    cert and chain are derived from it and meta is recomputed from the leaf.
    The attempt, retry time and ARI window of the old meta.json go to
    state.json. Then the old files are deleted.
    """
    present = [f for f in layout.LEGACY_FILES if storage.exists(layout.legacy_key(name, f))]
    if not present:
        return False

    def certs_of(*files: str) -> list[x509.Certificate]:
        out: list[x509.Certificate] = []
        for f in files:
            try:
                out += _parse_certs(storage.load(layout.legacy_key(name, f)))
            except (FileNotFoundError, ValueError):
                return []
        return out

    candidates = [certs_of(f) for f in ("fullchain.pem", "bundle.pem", "bundle.prev.pem")]
    candidates.append(certs_of("cert.pem", "chain.pem") if "cert.pem" in present else [])
    good = [c for c in candidates if c and _consistent_chain(c)]
    old_meta: CertMeta | None = None
    try:
        raw = storage.load(layout.legacy_key(name, "meta.json"))
        old_meta = CertMeta.from_json(json.loads(raw))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        old_meta = None
    if good:
        best = max(good, key=lambda c: (c[0].not_valid_before_utc, c[0].serial_number))
        leaf, chain = best[0], best[1:]
        serial = format(leaf.serial_number, "x")
        current = load_current(storage, name)
        if current is None or current.leaf.not_valid_before_utc < leaf.not_valid_before_utc:
            if old_meta is not None and old_meta.serial == serial and old_meta.installed_at:
                installed_at = old_meta.installed_at
            else:
                installed_at = leaf.not_valid_before_utc.timestamp()
            install_generation(
                storage, name, leaf, chain, installed_at, old_meta.directory if old_meta else None
            )
    if old_meta is not None:
        keep = old_meta

        def carry(state: CertState) -> CertState:
            return replace(
                state,
                last_attempt=state.last_attempt or keep.last_attempt,
                retry_not_before=state.retry_not_before or keep.retry_not_before,
                ari=state.ari or keep.ari,
            )

        update_state(storage, name, carry)
    for f in present:
        storage.delete(layout.legacy_key(name, f))
    log.info(
        "certificate %s: migrated the old flat layout (%s) into a generation",
        name, ", ".join(present),
    )  # fmt: skip
    return True
