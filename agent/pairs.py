"""Dual certificates: one certificate per key type (RSA, ECDSA) for the same names,
renewed, stored and switched as a pair.

A `[[certificates]]` entry with `keys = [...]` is loaded as one
`CertificateConfig` per key (`NAME.rsa`, `NAME.ecdsa`; `group` = NAME). Each is
a certificate of its own for everything single-key already does: storage
(`certificates/NAME.rsa/...`), its own ARI window and `replaces`, its own
HAProxy bundle `<cert_dir>/NAME.rsa.pem` in the crt-list (no SNI filter: HAProxy
matches both by their names and picks by the client's signature algorithms),
deploys, status and metrics. What this module adds is the pair rule:

- When one key's certificate is due, every key of the pair is ordered
  (`order_together`), under all the pair's certificate locks (`renew_pair`).
- Only when every order was issued and checked is the new pair installed:
  each generation written, then the pair pointer `pairs/NAME.json` (ONE
  atomic store: the commit point), then each `current` pointer, then the
  deploys. A crash before the pair pointer leaves the old pair (start-up
  repair deletes the unpaired new generation instead of adopting it); a
  crash after it is rolled forward by the repair (`pinned_generations`).
- One order failed: the old pair stays stored and served, the failure is
  recorded for that key, and the other key's new certificate is dropped
  (logged with its serial) -- unless that key's served certificate is
  about to expire (less than 1/20 of its lifetime left, the renewal's
  emergency threshold) or there is none: then it is installed alone, and
  the log and the result say so.

Key rollover (agent/rollover.py) is per key type: each key whose switch is
due begins it (recorded in its state.json before the order) and is ordered
for its next key, the other key renews with its current key, and the pair
rule above decides what is installed. Every generation records the key file
it was ordered for, so each bundle pairs its leaf with its own key whatever
a kill interrupts; a switch whose pair was not installed stays recorded and
is resumed by the next run, one whose generation became current is finished
(`rollover.settle`) before anything is decided.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from agent import keys, layout, rollover
from agent.certstate import CertMeta, switch_generation, write_generation
from agent.config import CertificateConfig, Config
from agent.storage import FenceRejected, LockLost, LockTimeout, Storage

if TYPE_CHECKING:
    from agent.renewal import CheckedChain, Renewer, RenewResult

log = logging.getLogger(__name__)


# --- the pair pointer ----------------------------------------------------------------


def load_pair(storage: Storage, group: str) -> dict[str, str]:
    """The generations the pair pointer of `group` names ({variant name: id}); {} if none
    (no pair installed yet) or unreadable (logged: the variants' own pointers count)."""
    try:
        raw = storage.load(layout.pair_key(group))
    except FileNotFoundError:
        return {}
    try:
        gens = json.loads(raw)["generations"]
        return {
            str(k): str(v)
            for k, v in gens.items()
            if isinstance(v, str) and layout.is_generation_id(v)
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.error("dual certificate %s: unreadable pair pointer %s: %s", group,
                  layout.pair_key(group), e)  # fmt: skip
        return {}


def pair_bytes(group: str, generations: Mapping[str, str]) -> bytes:
    """The pair pointer's content: {"group", "generations": {variant: id}} (JSON)."""
    for gen_id in generations.values():
        layout.check_generation_id(gen_id)
    data = {"group": group, "generations": dict(sorted(generations.items()))}
    return (json.dumps(data, indent=2) + "\n").encode()


def save_pair(storage: Storage, group: str, generations: Mapping[str, str]) -> None:
    """Write the pair pointer (one atomic store). Caller holds every variant's cert lock."""
    storage.store(layout.pair_key(group), pair_bytes(group, generations))


def pinned_generations(config: Config, storage: Storage) -> dict[str, str]:
    """{variant name: generation} of every configured dual certificate's pair pointer,
    for `agent.certstate.repair(pinned=...)`."""
    pinned: dict[str, str] = {}
    names = {c.name for c in config.certificates}
    for group in dict.fromkeys(c.group for c in config.certificates if c.group):
        pinned.update((k, v) for k, v in load_pair(storage, group).items() if k in names)
    return pinned


# --- grouping ------------------------------------------------------------------------


def units(certs: Iterable[CertificateConfig]) -> list[tuple[CertificateConfig, ...]]:
    """`certs` as renewal units, in order: each single-key certificate alone, the
    keys of one dual certificate together."""
    out: dict[str, list[CertificateConfig]] = {}
    for c in certs:
        out.setdefault(f"g:{c.group}" if c.group else f"c:{c.name}", []).append(c)
    return [tuple(u) for u in out.values()]


def order_together(
    certs: Sequence[CertificateConfig],
    due: list[CertificateConfig],
    pushes: list[CertificateConfig],
    results: dict[str, RenewResult],
    dry_run: bool,
) -> tuple[list[CertificateConfig], list[CertificateConfig]]:
    """Renewer.run's fix-up: a dual certificate with one key due (in `due`, or a
    dry run's "would renew") has all its keys ordered. Returns (due, pushes);
    `results` loses the joined keys' not-due results (dry run: says why)."""
    from agent.renewal import RenewResult

    def would_renew(c: CertificateConfig) -> bool:
        r = results.get(c.name)
        return r is not None and r.status == "dry-run" and r.reason.startswith("would renew:")

    due_names = {c.name for c in due}
    groups = {c.group for c in certs if c.group and (c.name in due_names or would_renew(c))}
    if not groups:
        return due, pushes
    joined: list[CertificateConfig] = []
    for c in certs:
        if c.group not in groups or c.name in due_names:
            continue
        if dry_run:
            if not would_renew(c):
                old = results.get(c.name)
                results[c.name] = RenewResult(
                    c.name, "dry-run", "would renew: its pair's other key is due",
                    old.serial if old else None, old.not_after if old else None,
                )  # fmt: skip
            continue
        results.pop(c.name, None)
        joined.append(c)
    joined_names = {c.name for c in joined}
    pushes = [c for c in pushes if c.name not in joined_names]
    order = {c.name: i for i, c in enumerate(certs)}
    return sorted([*due, *joined], key=lambda c: order[c.name]), pushes


# --- renewing a pair -----------------------------------------------------------------


def urgent(meta: CertMeta | None, now: float) -> str | None:
    """Why a key's new certificate may be installed without its pair (its served one
    is missing, expired or within the renewal's emergency threshold), or None."""
    from agent.renewal import EMERGENCY_FRACTION

    if meta is None or not meta.installed or meta.not_after is None:
        return "it had no certificate yet"
    if meta.not_after <= now:
        return "its served certificate has expired"
    not_before = meta.not_before if meta.not_before is not None else meta.not_after - 90 * 86400
    lifetime = max(meta.not_after - not_before, 1.0)
    if meta.not_after - lifetime * EMERGENCY_FRACTION <= now:
        return "its served certificate has less than 1/20 of its lifetime left"
    return None


def renew_pair(
    renewer: Renewer, unit: Sequence[CertificateConfig], force: bool, started: float
) -> dict[str, RenewResult]:
    """Renew the keys `unit` of one dual certificate as a pair (see the module doc).
    One RenewResult per key."""
    from agent.renewal import RenewResult

    st = renewer.storage
    group = unit[0].label
    with ExitStack() as stack:
        tokens: dict[str, str] = {}
        # Sorted: two runs taking one pair's locks never wait on each other in a circle.
        for cfg in sorted(unit, key=lambda c: c.name):
            try:
                tokens[cfg.name] = stack.enter_context(
                    st.locked(layout.cert_lock(cfg.name), timeout=2.0,
                              expires_after=renewer.lease)
                )  # fmt: skip
            except LockTimeout:
                return {
                    c.name: RenewResult(c.name, "not-due", "another process is renewing it now")
                    for c in unit
                }
        # Each key type's rollover state first (finish a switch a kill interrupted,
        # adopt or create its next key), as a single-key certificate's run does.
        for c in unit:
            renewer._settle_keys(c)
        # Re-check under the locks: a concurrent run may have just renewed the pair.
        decided = {c.name: renewer._due(c, force, refresh_ari=False, started_at=started)
                   for c in unit}  # fmt: skip
        ordering = [c for c in unit if decided[c.name][0] == "order"]
        if not ordering:
            results: dict[str, RenewResult] = {}
            for c in unit:
                action, why, meta = decided[c.name]
                if action == "deploy":
                    assert meta is not None
                    results[c.name] = renewer._push_stored(c, why, meta)
                else:
                    results[c.name] = RenewResult(
                        c.name, "not-due", why, meta.serial if meta else None,
                        meta.not_after if meta else None,
                    )  # fmt: skip
            return results
        first = ordering[0]
        whys = {
            c.name: decided[c.name][1]
            if decided[c.name][0] == "order"
            else f"with its pair ({first.key_kind}: {decided[first.name][1]})"
            for c in unit
        }
        return _order_pair(renewer, unit, group, decided, whys, tokens)
    raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow)


def _order_pair(
    renewer: Renewer,
    unit: Sequence[CertificateConfig],
    group: str,
    decided: Mapping[str, tuple[str | None, str, CertMeta | None]],
    whys: Mapping[str, str],
    tokens: Mapping[str, str],
) -> dict[str, RenewResult]:
    from agent.renewal import RenewResult, error_type

    checked: dict[str, CheckedChain] = {}
    failed: dict[str, RenewResult] = {}
    # Per key type: the key rollover its order is for (None: a renewal with the
    # current key) and the key file it is ordered for (recorded in its generation).
    switches: dict[str, rollover.Switch | None] = {}
    key_paths: dict[str, Path] = {}
    for cfg in unit:
        meta = decided[cfg.name][2]
        if failed and any(r.error_type == "rateLimited" for r in failed.values()):
            # The CA said stop: no second order into its hold.
            hold = next(r for r in failed.values() if r.error_type == "rateLimited")
            renewer._record_failure(cfg, hold.reason, hold.retry_at, locked=True)
            failed[cfg.name] = RenewResult(
                cfg.name, "failed", f"not ordered: {hold.reason}", error_type="rateLimited",
                retry_at=hold.retry_at,
            )  # fmt: skip
            continue
        try:
            # Recorded in this key's state.json before its order; a failed order
            # leaves it recorded, and the next run resumes it (as for one key).
            switch = renewer._begin_switch(cfg, meta)
        except (keys.StableKeyError, OSError) as e:
            msg = f"key rollover: {type(e).__name__}: {e}"
            renewer._record_failure(cfg, msg, None, locked=True)
            failed[cfg.name] = RenewResult(cfg.name, "failed", msg, error_type=error_type(e))
            log.error("dual certificate %s: the %s key: %s", group, cfg.key_kind, msg)
            continue
        switches[cfg.name] = switch
        key_paths[cfg.name] = (
            Path(switch.new.path)
            if switch is not None
            else rollover.current_key_path(cfg, meta.keys if meta else None)
        )
        got = renewer._order_checked(cfg, meta, tokens.get(cfg.name), switch, key_paths[cfg.name])
        if isinstance(got, RenewResult):
            failed[cfg.name] = got
            log.error("dual certificate %s: the %s order failed: %s", group, cfg.key_kind,
                      got.reason)  # fmt: skip
        else:
            checked[cfg.name] = got
    if not failed:
        return _install(renewer, unit, group, checked, whys, tokens, None, switches, key_paths)
    results = dict(failed)
    now = renewer.clock()
    failed_kinds = ", ".join(c.key_kind or c.name for c in unit if c.name in failed)
    alone: dict[str, CheckedChain] = {}
    for cfg in unit:
        if cfg.name not in checked:
            continue
        chain = checked[cfg.name]
        why_alone = urgent(decided[cfg.name][2], now)
        if why_alone is not None:
            log.warning(
                "dual certificate %s: the %s order failed; installing the new %s certificate "
                "(serial %x) alone because %s", group, failed_kinds, cfg.key_kind,
                chain.leaf.serial_number, why_alone,
            )  # fmt: skip
            alone[cfg.name] = chain
            continue
        msg = (
            f"issued and checked (serial {chain.leaf.serial_number:x}) but not installed: "
            f"the {failed_kinds} order failed, so the old pair stays served"
        )
        log.warning("dual certificate %s: %s certificate %s", group, cfg.key_kind, msg)
        renewer._record_failure(cfg, msg, None, locked=True)
        meta = decided[cfg.name][2]
        results[cfg.name] = RenewResult(
            cfg.name, "failed", msg, meta.serial if meta else None,
            meta.not_after if meta else None, error_type="pair",
        )  # fmt: skip
    if alone:
        whys_alone = {
            n: f"{whys[n]}; installed alone: the {failed_kinds} order failed and "
            f"{urgent(decided[n][2], now)}"
            for n in alone
        }
        installed = [c for c in unit if c.name in alone]
        results.update(_install(renewer, installed, group, alone, whys_alone, tokens,
                                failed_kinds, switches, key_paths))  # fmt: skip
    return results


def _install(
    renewer: Renewer,
    unit: Sequence[CertificateConfig],
    group: str,
    checked: Mapping[str, CheckedChain],
    whys: Mapping[str, str],
    tokens: Mapping[str, str],
    alone: str | None,
    switches: Mapping[str, rollover.Switch | None],
    key_paths: Mapping[str, Path],
) -> dict[str, RenewResult]:
    """Store every chain of `checked` as a generation, then the pair pointer (the
    commit point), then switch each `current`; then finish each key rollover
    (`switches`), deploy each, and revoke what an emergency switch queued. The
    caller holds every key's cert lock (`tokens`: their owner tokens).

    Each generation records the key file it was ordered for (`key_paths`), so
    its bundle is built from that key whatever point a kill stops this at: a
    generation the pair pointer does not name is deleted by the start-up
    repair, one it names is rolled forward, and `rollover.settle` then
    finishes that key's switch (its current pin is the switch's target)."""
    from agent.renewal import RenewResult

    st = renewer.storage
    now = renewer.clock()
    metas: dict[str, CertMeta] = {}
    old_leaves = {
        cfg.name: renewer._current_cert(cfg.name) for cfg in unit if switches.get(cfg.name)
    }
    # Every writer of this pair takes all its keys' locks, in name order: the
    # first one is held by whoever installs the pair, so the pair pointer is
    # committed fenced on it (Storage.commit_fenced, as Renewer.install does for
    # one key): a node whose lease ran out while it ordered cannot switch the
    # pair over a newer one, whatever it wrote before.
    lead = min(tokens)
    lead_lock = layout.cert_lock(lead)
    try:
        for cfg in unit:
            chain = checked[cfg.name]
            metas[cfg.name] = write_generation(
                st, cfg.name, chain.leaf, chain.chain, now, renewer.config.acme.directory,
                profile=renewer.config.acme.profile or None,
                key_path=str(key_paths.get(cfg.name, cfg.key)),
                fence=st.fence(layout.cert_lock(cfg.name)), node=renewer.node,
            )  # fmt: skip
        # The leases, right before the irreversible step (as Renewer.install does).
        for cfg in unit:
            st.renew_lock(layout.cert_lock(cfg.name), tokens[cfg.name], renewer.lease)
        pair = load_pair(st, group)
        for name, meta in metas.items():
            assert meta.generation is not None
            pair[name] = meta.generation
        st.commit_fenced(
            lead_lock, tokens[lead], st.fence(lead_lock), layout.fence_key(lead),
            {layout.pair_key(group): pair_bytes(group, pair)},
        )  # fmt: skip
    except LockLost as e:
        fenced = isinstance(e, FenceRejected)
        msg = (
            f"not installed by node {renewer.node}: {e} "
            + ("(another holder installed this pair since)" if fenced
               else "(the orders took longer than the lock's lease)")
        )  # fmt: skip
        log.error("dual certificate %s: %s", group, msg)
        for meta in metas.values():  # written, never pointed to: nothing to keep
            if meta.generation is not None:
                st.delete_all(layout.generation_prefix(meta.name, meta.generation))
        kind = "fence" if fenced else "lock"
        return {c.name: RenewResult(c.name, "failed", msg, error_type=kind) for c in unit}
    for cfg in unit:
        gen = metas[cfg.name].generation
        assert gen is not None
        switch_generation(st, cfg.name, gen)
        # That order is done: the next run places a new one, it does not resume it.
        renewer._clear_order(cfg)
        metas[cfg.name] = metas[cfg.name].with_state(renewer._fresh_state(cfg.name, now))
        switch = switches.get(cfg.name)
        if switch is not None:
            renewer._finish_switch(cfg, switch, old_leaves.get(cfg.name))
    if alone is None:
        log.info("dual certificate %s: new pair installed (%s)", group, ", ".join(
            f"{c.key_kind} serial {metas[c.name].serial}" for c in unit))  # fmt: skip
    results = {cfg.name: renewer._installed(cfg, whys[cfg.name], metas[cfg.name]) for cfg in unit}
    for cfg in unit:
        # An emergency switch's keyCompromise revocation: once the new leaf is served.
        if switches.get(cfg.name) is not None and results[cfg.name].status == "renewed":
            renewer._revoke_pending(cfg)
    return results
