"""Where everything of a certificate lives: every storage key and HAProxy file path.

This module is the ONE place that spells out names; storage code, the
renewer, the deployer, the importer and the benches ask it. Every name is
checked by `agent.storage.safe_key` / `safe_name`, so a hostile certificate
name cannot leave the storage root or `cert_dir`.

Storage keys (`agent.storage.Storage`), per certificate NAME:

    certificates/NAME/current                 the id of the served generation (atomic pointer)
    certificates/NAME/state.json              mutable state: last attempt, retry time, ARI
                                              window, deployed facts (under the cert lock)
    certificates/NAME/gen/ID/cert.pem         leaf            } one generation: immutable,
    certificates/NAME/gen/ID/chain.pem        intermediates   } written completely before
    certificates/NAME/gen/ID/fullchain.pem    leaf + chain    } `current` points to it;
    certificates/NAME/gen/ID/meta.json        leaf facts      } meta.json is written last
    certificates/NAME/fence                   the fencing number of the last install
                                              (decimal): written in one atomic step with
                                              `current` (Storage.commit_fenced)
    certificates/NAME/order.json              the order in flight: its URL, status,
                                              finalize and certificate URLs, the node
                                              and fence that placed it; deleted once done

ID is `<unix milliseconds, 13 digits>-<serial in lowercase hex>`, so ids sort
by installation time. Storage holds public material and metadata only: the
HAProxy bundle (full chain + private key [+ DH params]) is assembled on the
node that deploys it, from the stored full chain and that node's key file.

The flat layout of older versions (`certificates/NAME/{cert,chain,fullchain,
bundle,bundle.prev}.pem` and `meta.json`) is named by `legacy_key`, only so
that the start-up repair can migrate it.

HAProxy files: `bundle_path(cert_dir, NAME)` is `<cert_dir>/NAME.pem`, the file
the HAProxy config's `crt` / crt-list line names.

Dual certificates (one key per type, `keys = [...]` in the config): each key's
certificate is a certificate of its own named `variant_name(NAME, KIND)`,
`NAME.rsa` or `NAME.ecdsa`, with everything above (certificates/NAME.rsa/...,
<cert_dir>/NAME.rsa.pem). What pairs them is one more key:

    pairs/NAME.json        {"generations": {"NAME.rsa": ID, "NAME.ecdsa": ID}}: the
                           generations served together, written (atomically, under
                           both variants' locks) after both are stored and before
                           their `current` pointers move; start-up repair points
                           each `current` at it (agent/pairs.py)

A single-key certificate has no variant and no pair key: its names are unchanged.

DNS challenges: `dns_pending_key(NAME, DIGEST)` (dns-01 journal of published
records, under `DNS_PENDING`), `dns_persist_key(NAME)` (dns-persist-01 records).

Fleet: `FLEET_MARKER` ("fleet/initialized") exists while the shared store
has not lost its data; a node that finds it missing (Redis restarted empty)
rebuilds what it can from the certificates it serves (agent.renewal).

Locks (`Storage.lock` names): `cert_lock(NAME)` guards every write of one
certificate's keys; `RENEW_COMMAND_LOCK` makes overlapping cron runs wait.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.storage import safe_key, safe_name

CERTIFICATES = "certificates"

CURRENT = "current"
STATE = "state.json"
GENERATIONS = "gen"
CERT = "cert.pem"
CHAIN = "chain.pem"
FULLCHAIN = "fullchain.pem"
META = "meta.json"
FENCE = "fence"
ORDER = "order.json"
# The files of one generation, in the order they are written (meta.json last:
# a generation whose meta.json exists and parses is complete).
GENERATION_FILES = (CERT, CHAIN, FULLCHAIN, META)

LEGACY_FILES = (
    "cert.pem", "chain.pem", "fullchain.pem", "bundle.pem", "bundle.prev.pem", "meta.json",
)  # fmt: skip

RENEW_COMMAND_LOCK = "renew-command"

_GENERATION_ID = re.compile(r"^[0-9]{13}-[0-9a-f]{1,64}$")


def cert_prefix(name: str) -> str:
    """Prefix of every key of certificate `name`: certificates/NAME."""
    return f"{CERTIFICATES}/{safe_name(name)}"


def cert_key(name: str, filename: str) -> str:
    """Key of `filename` directly below certificates/NAME (current, state.json, ...)."""
    return safe_key(f"{cert_prefix(name)}/{filename}")


def current_key(name: str) -> str:
    """The pointer: holds the id of the generation being served (ASCII, no newline)."""
    return cert_key(name, CURRENT)


def state_key(name: str) -> str:
    """Mutable per-certificate state (JSON), read-modify-written under `cert_lock(name)`."""
    return cert_key(name, STATE)


def fence_key(name: str) -> str:
    """The fencing number of the lock hold that installed the current generation."""
    return cert_key(name, FENCE)


def order_key(name: str) -> str:
    """The order in flight for `name` (JSON, see agent.renewal.Renewer._save_order)."""
    return cert_key(name, ORDER)


FLEET_MARKER = "fleet/initialized"


def generations_prefix(name: str) -> str:
    """Prefix below which every generation of `name` lives."""
    return cert_key(name, GENERATIONS)


def generation_prefix(name: str, gen_id: str) -> str:
    """Prefix of one generation: certificates/NAME/gen/ID."""
    return f"{generations_prefix(name)}/{check_generation_id(gen_id)}"


def generation_key(name: str, gen_id: str, filename: str) -> str:
    """Key of one file (cert.pem, chain.pem, fullchain.pem, meta.json) of a generation."""
    if filename not in GENERATION_FILES:
        raise ValueError(f"{filename!r} is not a file of a generation {GENERATION_FILES}")
    return f"{generation_prefix(name, gen_id)}/{filename}"


def legacy_key(name: str, filename: str) -> str:
    """Key of a file of the old flat layout (read by the start-up migration only)."""
    if filename not in LEGACY_FILES:
        raise ValueError(f"{filename!r} is not a file of the old layout {LEGACY_FILES}")
    return cert_key(name, filename)


def new_generation_id(installed_at: float, serial: int) -> str:
    """The id of a generation installed at `installed_at` (UNIX s) for leaf `serial`."""
    return f"{int(installed_at * 1000):013d}-{serial:x}"


def is_generation_id(text: str) -> bool:
    return bool(_GENERATION_ID.match(text))


def check_generation_id(gen_id: str) -> str:
    """Return `gen_id` if it has the shape of `new_generation_id`'s ids; ValueError if not."""
    if not is_generation_id(gen_id):
        raise ValueError(f"invalid certificate generation id {gen_id!r}")
    return gen_id


def cert_lock(name: str) -> str:
    """Name of the lock held while anything of certificate `name` is written."""
    return f"cert-{safe_name(name)}"


def bundle_path(cert_dir: Path, name: str) -> Path:
    """The HAProxy bundle of certificate `name`: `<cert_dir>/<name>.pem`."""
    return Path(cert_dir) / f"{safe_name(name)}.pem"


# Dual certificates (agent/pairs.py): one certificate per key kind, paired.
KEY_KINDS = ("rsa", "ecdsa")
PAIRS = "pairs"


def key_kind(key_type: str) -> str:
    """The kind ("rsa" or "ecdsa") of a config key_type (rsa2048..rsa4096, ec256, ec384)."""
    if key_type.startswith("rsa"):
        return "rsa"
    if key_type.startswith("ec"):
        return "ecdsa"
    raise ValueError(f"unknown key type {key_type!r}")


def variant_name(group: str, kind: str) -> str:
    """The certificate name of the `kind` key of dual certificate `group`: GROUP.KIND."""
    if kind not in KEY_KINDS:
        raise ValueError(f"{kind!r} is not a key kind {KEY_KINDS}")
    return safe_name(f"{safe_name(group)}.{kind}")


def pair_key(group: str) -> str:
    """The pair pointer of dual certificate `group`: pairs/GROUP.json."""
    return safe_key(f"{PAIRS}/{safe_name(group)}.json")



# DNS challenges (agent/dns01.py, agent/dns_persist.py): not per-generation state.
DNS_PENDING = "dns/pending"


def dns_pending_key(name: str, digest: str) -> str:
    """Journal entry of the dns-01 records an order of certificate `name` published
    (`digest`: hex of the values), deleted once they are removed again."""
    return safe_key(f"{DNS_PENDING}/{safe_name(name)}-{digest}.json")


def dns_persist_key(name: str) -> str:
    """The dns-persist-01 records `dns-persist NAME` printed, for `status` checks."""
    return safe_key(f"dns/persist/{safe_name(name)}.json")


# atomic_write's temp files: ".<target name>.<random>.tmp" (see agent.storage).
_TEMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def temp_target(filename: str) -> str | None:
    """The file an `atomic_write` temp file named `filename` was for, or None."""
    m = _TEMP.match(filename)
    return m.group("target") if m else None


def deployed_key(node: str | None, instance: str) -> str:
    """The key of an instance's deploy facts in a certificate's state.json: the
    instance name alone on a single node; "NODE|INSTANCE" in a fleet, whose
    nodes share state.json and often name their runtime API alike
    (unix:/run/haproxy/admin.sock on every node)."""
    return instance if node is None else f"{node}|{instance}"


def deploy_node(config: object) -> str | None:
    """The node that prefixes deploy facts (`deployed_key`): [fleet] node, else None."""
    fleet = getattr(config, "fleet", None)
    return None if fleet is None else str(fleet.node)
