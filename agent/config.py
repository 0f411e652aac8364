"""The TOML configuration: schema, defaults and validation.

`load_config(path)` returns a frozen `Config` or raises `ConfigError` naming the
file and the key ("config.toml: certificates[1].key: file /x/y.key is not
readable"). Loading never writes anything: a `generate_key` key that does not
exist yet is only checked for a writable directory. Relative paths are resolved
against the directory of the config file. Indices in key names are 0-based.

Schema (every key optional unless marked required):

    state_dir = "/var/lib/haproxy-acme-agent"
    strict_permissions = false  (true: refuse to start when a key is group/world-accessible)
    [acme]      directory (required: URL, or "letsencrypt" / "letsencrypt-staging"),
                email, ca_bundle, eab_kid, eab_hmac_key, profile,
                poll_interval = 2 (s, the cap of the adaptive polling), timeout = 30 (s),
                max_concurrent_orders = 16,
                trusted_roots (PEM file of roots issued chains must lead to; default: the
                system trust store), allow_leaf_only = false
    [spoa]      listen = "127.0.0.1:12345", hello_timeout = 5 (s), idle_timeout = 30 (s),
                max_connections = 1000, max_pending_per_peer = 256
    [haproxy]   runtime_api = [] ("unix:/path" or "tcp:host:port"), cert_dir = <state_dir>/haproxy,
                crt_list = "", verify = [] ("host:port"), reload_command = [], timeout = 5.0 (s),
                bufsize = 16384 (bytes; must equal HAProxy's tune.bufsize)
    [challenges] answer = "spoe" | "map" (map: HAProxy answers from a map the agent fills over
                the runtime API; needs [haproxy] runtime_api at level admin),
                map (default: "virt@acme" where HAProxy declares it, 3.0+, else the file
                <cert_dir>/acme-challenge.map; or "virt@NAME" or a file path),
                map_timeout = 10 (s an order waits for every instance to take a token)
    [metrics]   listen = "127.0.0.1:9810"
    [daemon]    control_socket = <state_dir>/control.sock, check_interval = 3600 (s),
                reconcile_interval = 30 (s), retry_base = 60 (s), retry_max = 6h,
                log_format = "text" | "json"
    [fleet]     (absent: a single node, file storage, in-memory challenges)
                redis = "redis://host:6379/0" | "rediss://..." | "unix:///path.sock",
                or sentinels = ["host:26379", ...] + service = "mymaster";
                username, password_file (ACL user; never a password in the URL),
                ca_file (rediss:// only), node = <host name>, namespace = "haproxy-acme",
                secret_file (required: 32 random bytes, 0600, the same on every node)
    [[certificates]]  name (required), domains (required), key (required), csr,
                generate_key = false, key_type = "ec256", backup_pins = [], dhparam,
                or instead of key/csr/generate_key/key_type: keys = [{ key, key_type,
                generate_key, csr, next_key, generate_next_key }, ...], one key per type
                (RSA and ECDSA): a dual certificate, stored and served as NAME.rsa and
                NAME.ecdsa (docs/dual-certificates.md),
                next_key (path) or generate_next_key = false (with `keys`: per key,
                inside `keys`; refused with [fleet]: copy one next_key to every node),
                announce_for = "60d",
                previous_pin_for = "60d", rollover_at (UTC timestamp; see docs/pinning.md),
                renew_before ("30d", "12h", "90m", "3600s"), allow_leaf_only (default: [acme]'s),
                challenge = "http-01" | "dns-01" | "dns-persist-01" (wildcards "*.example.com"
                need a DNS challenge; dns-01 names must lie in a [[dns]] zone)
    [[dns]]     zone (required), then either nothing (lookup only: dns-persist-01
                checks), or server ("host:port", default port 53),
                tsig_key_name, tsig_algorithm = "hmac-sha256", tsig_secret_file (base64 or a
                BIND key file; mode 0600) or hook = ["/path/prog", ...], hook_timeout = 30 (s);
                check_servers = [] ("host:port"; default: the zone's NS set on port 53),
                propagation_timeout = 120 (s). See docs/dns.md.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agent import keys, layout

DEFAULT_CONFIG_PATH = Path("/etc/haproxy-acme-agent/config.toml")
DEFAULT_STATE_DIR = "/var/lib/haproxy-acme-agent"

DIRECTORY_ALIASES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}

T = TypeVar("T")


class ConfigError(Exception):
    """An invalid configuration. `str()` is "FILE: KEY: MESSAGE" (KEY omitted when empty)."""

    def __init__(self, file: str | os.PathLike[str], key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.message}"
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class AcmeConfig:
    directory: str
    email: str | None = None
    ca_bundle: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    profile: str | None = None
    poll_interval: float = 2.0  # cap of the adaptive polling (issuer.PollSchedule)
    timeout: float = 30.0
    max_concurrent_orders: int = 16
    # PEM file of the roots an issued chain must lead to (None: the system trust store).
    trusted_roots: Path | None = None
    # A chain-less (leaf-only) answer is accepted: the chain is served some other way.
    allow_leaf_only: bool = False


@dataclass(frozen=True)
class Listen:
    """A "host:port" listen address; host without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SpoaConfig:
    listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 12345))
    # The SPOA's door (agent/spoa.py module docstring): seconds from accept to
    # a valid HELLO; seconds without a complete frame; connections in all;
    # connections without HELLO yet per peer address.
    hello_timeout: float = 5.0
    idle_timeout: float = 30.0
    max_connections: int = 1000
    max_pending_per_peer: int = 256


@dataclass(frozen=True)
class HAProxyConfig:
    cert_dir: Path
    runtime_api: tuple[str, ...] = ()
    crt_list: Path | None = None
    verify: tuple[Listen, ...] = ()
    reload_command: tuple[str, ...] = ()
    timeout: float = 5.0
    bufsize: int = 16384  # HAProxy's tune.bufsize: the largest runtime API payload + 1


ANSWER_MODES = ("spoe", "map")
DEFAULT_MAP_FILE = "acme-challenge.map"  # in [haproxy] cert_dir, for HAProxy before 3.0


@dataclass(frozen=True)
class ChallengesConfig:
    """How http-01 challenges are answered (see docs/challenge-modes.md).

    `answer`: "spoe" (HAProxy asks the agent over SPOE) or "map" (the agent
    puts tokens into an HAProxy map over the runtime API). `map`: the map's
    name; None picks "virt@acme" or the default file per instance (see
    agent.challenge_map). `map_timeout`: seconds an order waits for every
    runtime API instance to take a token before it fails.
    """

    answer: str = "spoe"
    map: str | None = None
    map_timeout: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 9810))


@dataclass(frozen=True)
class DaemonConfig:
    control_socket: Path
    check_interval: float = 3600.0
    log_format: str = "text"
    reconcile_interval: float = 30.0  # s between checks that HAProxy serves what is stored
    retry_base: float = 60.0  # s before the first retry of a failed renewal
    retry_max: float = 6 * 3600.0  # s, cap of the exponential backoff


@dataclass(frozen=True)
class DnsZoneConfig:
    """One `[[dns]]` zone for dns-01 (agent/dns01.py): RFC 2136 + TSIG, or a hook program."""

    zone: str  # without the trailing dot, lower case
    server: Listen | None = None  # primary accepting RFC 2136 updates
    tsig_key_name: str | None = None
    tsig_algorithm: str = "hmac-sha256"
    tsig_secret_file: Path | None = None  # base64 secret (or a BIND key file), mode 0600
    hook: tuple[str, ...] = ()  # program + fixed arguments; used instead of RFC 2136
    hook_timeout: float = 30.0  # s per hook run
    check_servers: tuple[Listen, ...] = ()  # where to wait for the record; () = NS lookup
    propagation_timeout: float = 120.0  # s to wait until every server answers


TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")


@dataclass(frozen=True)
class CertificateConfig:
    name: str
    domains: tuple[str, ...]
    key: Path
    csr: Path | None = None
    generate_key: bool = False
    key_type: str = "ec256"
    backup_pins: tuple[str, ...] = ()
    dhparam: Path | None = None
    renew_before: float | None = None  # seconds before not_after; None = automatic rule
    allow_leaf_only: bool | None = None  # None: [acme] allow_leaf_only decides
    challenge: str = "http-01"  # "http-01" | "dns-01" | "dns-persist-01" (agent/solvers.py)
    # What checking `key` found at load time (None: a generate_key key not created yet).
    key_facts: keys.KeyFileFacts | None = field(default=None, compare=False, repr=False)
    # A certificate with `keys` (one key per type) is one CertificateConfig per key,
    # named `<group>.<key_kind>` (agent.layout.variant_name): `group` is the name in
    # the config, `key_kind` "rsa" or "ecdsa". Both None for a single-key certificate.
    group: str | None = None
    key_kind: str | None = None
    # Key rollover (agent/rollover.py, docs/pinning.md). `next_key`: the key to
    # announce and switch to; with `generate_next_key` the agent creates it
    # (once, 0600) and a fresh one after every switch. Durations in seconds,
    # `rollover_at` a UNIX time (UTC).
    next_key: Path | None = None
    generate_next_key: bool = False
    announce_for: float = 60 * 86400.0
    previous_pin_for: float = 60 * 86400.0
    rollover_at: float | None = None

    @property
    def label(self) -> str:
        """The name the operator wrote in the config (the group of a dual certificate)."""
        return self.group or self.name


@dataclass(frozen=True)
class FleetConfig:
    """[fleet]: several agents sharing storage, locks and challenges through Redis.

    Exactly one of `redis` (a URL) and `sentinels` (host, port pairs, with
    `service`) is set. `password_file` holds the ACL password (first line);
    `secret_file` the 32-byte fleet secret that encrypts secrets kept in Redis.
    """

    node: str
    namespace: str
    secret_file: Path
    redis: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    acme: AcmeConfig
    spoa: SpoaConfig
    haproxy: HAProxyConfig
    metrics: MetricsConfig
    daemon: DaemonConfig
    certificates: tuple[CertificateConfig, ...] = ()
    strict_permissions: bool = False
    challenges: ChallengesConfig = field(default_factory=ChallengesConfig)
    dns: tuple[DnsZoneConfig, ...] = ()
    fleet: FleetConfig | None = None

    @functools.cached_property
    def _by_name(self) -> dict[str, CertificateConfig]:
        # Built once per Config (frozen: its certificates never change). The
        # metrics ask for every certificate at each scrape: a scan each was
        # quadratic, 5 s of a scrape at 10,000 certificates.
        return {c.name: c for c in self.certificates}

    def certificate(self, name: str) -> CertificateConfig:
        """The certificate called `name`; KeyError if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    def find_certificate(self, name: str) -> CertificateConfig | None:
        """The certificate called `name`, or None."""
        return self._by_name.get(name)

    def pair(self, name: str) -> tuple[CertificateConfig, ...]:
        """Every key's certificate of the certificate `name` belongs to: the variants
        of its group (a dual certificate; `name` may be the group or a variant), or
        `(certificate(name),)`. KeyError if there is none."""
        for c in self.certificates:
            if c.name == name or (c.group is not None and c.group == name):
                if c.group is None:
                    return (c,)
                return tuple(v for v in self.certificates if v.group == c.group)
        raise KeyError(name)

    def expand_names(self, names: Sequence[str]) -> list[str]:
        """`names` with each dual certificate's group name (and each of its variants)
        replaced by all its variants, in config order; KeyError naming the unknown."""
        unknown = [n for n in names if not any(n in (c.name, c.group) for c in self.certificates)]
        if unknown:
            raise KeyError(f"no certificate named {', '.join(map(repr, unknown))}")
        wanted = {v.name for n in names for v in self.pair(n)}
        return [c.name for c in self.certificates if c.name in wanted]


@dataclass(frozen=True)
class _KeyEntry:
    """One parsed key of a certificate (see _Loader._key_entry)."""

    path: Path
    generate: bool
    key_type: str
    csr: Path | None
    facts: keys.KeyFileFacts | None = None  # what checking the file found (None: to be created)
    # This key type's next key (key rollover): set inside a `keys` entry.
    next_key: Path | None = None
    generate_next_key: bool = False

    @property
    def kind(self) -> str:
        return layout.key_kind(self.key_type)


# --- value parsers ---------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """Seconds from "30d", "12h", "90m", "3600s" (or a plain number of seconds); > 0."""
    if isinstance(value, bool):
        raise ValueError('expected a duration like "30d", "12h", "90m" or "3600s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(
                f'{value!r} is not a duration (use a number with s, m, h or d: "30d", "12h")'
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError('expected a duration like "30d"')
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def validate_domain(name: str, wildcard_ok: bool = False) -> str:
    """Return the lower-cased DNS name or raise ValueError saying what is wrong.

    A wildcard `*.example.com` (one leftmost "*" label, at least two labels
    under it) is accepted only with `wildcard_ok` (a DNS challenge validates it).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("empty domain name")
    if name != name.strip():
        raise ValueError(f"{name!r} has surrounding whitespace")
    if not name.isascii():
        raise ValueError(f"{name!r} is not ASCII (write internationalised names as xn-- A-labels)")
    if name.endswith("."):
        raise ValueError(f"{name!r}: write the name without the trailing dot")
    lower = name.lower()
    if lower.startswith("*."):
        if not wildcard_ok:
            raise ValueError(
                f'{name!r}: wildcard names need challenge = "dns-01" or "dns-persist-01"; '
                "http-01 cannot validate them"
            )
        if "*" in lower[2:]:
            raise ValueError(f"{name!r}: a wildcard may only be the whole leftmost label")
        validate_domain(lower[2:])
        return lower
    # Only a name ending in a digit (IPv4) or holding ':' (IPv6) can be an
    # address: skip the costly parse for the usual names (10,000 at start).
    if ":" in lower or lower[-1:].isdigit() or lower.endswith("]"):
        try:
            ipaddress.ip_address(lower.strip("[]"))
        except ValueError:
            pass
        else:
            raise ValueError(f"{name!r} is an IP address; only DNS names are supported")
    if len(lower) > 253:
        raise ValueError(f"{name!r} is longer than 253 characters")
    labels = lower.split(".")
    if len(labels) < 2:
        raise ValueError(f"{name!r} is not a fully qualified domain name")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise ValueError(f"{name!r} has an invalid label {label!r}")
    if labels[-1].isdigit():
        raise ValueError(f"{name!r} has an all-numeric top-level label")
    return lower


def parse_listen(value: object, default_host: str = "127.0.0.1") -> Listen:
    """ "host:port", "[v6]:port" or ":port" (-> default_host) into a Listen."""
    if not isinstance(value, str) or not value:
        raise ValueError('expected "host:port"')
    m = re.match(r"^\[([0-9A-Fa-f:.%\w]+)\]:(\d+)$", value)
    if m:
        host, port_s = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError as e:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from e
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not port_s.isdigit():
            raise ValueError(f'{value!r} is not "host:port"')
        if ":" in host:
            raise ValueError(f'{value!r}: write IPv6 addresses as "[addr]:port"')
        host = host or default_host
        if not re.match(r"^[A-Za-z0-9.-]+$", host):
            raise ValueError(f"{value!r}: invalid host {host!r}")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} out of range 1-65535")
    return Listen(host, port)


# --- the loader ------------------------------------------------------------------------


class _Section:
    """A TOML table being consumed: typed getters that raise ConfigError naming the key."""

    def __init__(self, loader: _Loader, prefix: str, data: Mapping[str, Any]) -> None:
        self.loader = loader
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.loader.file, self.key(name), message)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(
        self,
        name: str,
        kind: type[T] | tuple[type, ...],
        default: Any = None,
        required: bool = False,
    ) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass in Python; TOML keeps them apart, so do we.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_kind_name(kinds)}, got {_toml_type(value)}")
        return value

    def get_str(
        self, name: str, default: str | None = None, required: bool = False, empty_ok: bool = False
    ) -> str | None:
        value: str | None = self.get(name, str, default, required)
        if value is not None and not value and not empty_ok:
            raise self.error(name, "must not be empty")
        return value

    def get_number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.get(name, (int, float), default)
        if not minimum < float(value) <= maximum:
            raise self.error(name, f"must be greater than {minimum:g} and at most {maximum:g}")
        return float(value)

    def get_str_list(self, name: str) -> list[str]:
        value = self.get(name, list, [])
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(
                    self.loader.file,
                    f"{self.key(name)}[{i}]",
                    f"expected a string, got {_toml_type(item)}",
                )
        return list(value)

    def get_path(
        self, name: str, default: Path | None = None, required: bool = False
    ) -> Path | None:
        value = self.get_str(name, None, required, empty_ok=True)
        if value is None or value == "":
            return default
        return self.loader.resolve(value)

    def section(self, name: str) -> _Section:
        value = self.get(name, dict, {})
        return _Section(self.loader, self.key(name), value)

    def check_unknown(self) -> None:
        for k in self.data:
            if k not in self.used:
                raise ConfigError(self.loader.file, self.key(k), "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _toml_type(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _readable_file(path: Path) -> str | None:
    """None if `path` is a readable regular file, else what is wrong with it."""
    if not path.exists():
        return f"file {path} does not exist"
    if not path.is_file():
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"file {path} is not readable"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"file {path} is not readable ({e.strerror})"
    return None


class _Loader:
    def __init__(self, file: Path, cached_key_checks: bool = False) -> None:
        self.file = file
        self.base = file.resolve().parent
        self.dns_zones: tuple[DnsZoneConfig, ...] = ()
        self.cached_key_checks = cached_key_checks
        self.key_cache: Mapping[str, keys.KeyFileFacts] = {}
        # Whether a [fleet] section is present: known before the certificates
        # are read, whose next-key rules differ in a fleet (`_next_key`).
        self.fleet_configured = False

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def load(self) -> Config:
        try:
            raw = self.file.read_bytes()
        except FileNotFoundError:
            raise ConfigError(self.file, "", "file does not exist") from None
        except PermissionError:
            raise ConfigError(self.file, "", "file is not readable") from None
        except OSError as e:
            raise ConfigError(self.file, "", f"cannot read file: {e.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(self.file, "", f"not UTF-8 text ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(self.file, "", f"invalid TOML: {e}") from None

        top = _Section(self, "", data)
        state_dir = top.get_path("state_dir", Path(DEFAULT_STATE_DIR))
        strict_permissions = bool(top.get("strict_permissions", bool, False))
        assert state_dir is not None
        if problem := _not_a_directory(state_dir):
            raise top.error("state_dir", problem)
        if self.cached_key_checks:
            self.key_cache = keys.read_key_checks(key_checks_path(state_dir))
        acme = self._acme(top.section("acme"))
        spoa_s = top.section("spoa")
        spoa = self._spoa(spoa_s)
        spoa_s.check_unknown()
        haproxy = self._haproxy(top.section("haproxy"), state_dir)
        challenges = self._challenges(top.section("challenges"), haproxy)
        metrics_s = top.section("metrics")
        metrics = MetricsConfig(listen=self._listen(metrics_s, "listen", "127.0.0.1:9810"))
        metrics_s.check_unknown()
        daemon = self._daemon(top.section("daemon"), state_dir)
        self.dns_zones = self._dns_zones(top)
        self.fleet_configured = top.has("fleet")
        certs = self._certificates(top)
        fleet = self._fleet(top.section("fleet")) if top.has("fleet") else None
        top.check_unknown()
        return Config(
            path=self.file,
            state_dir=state_dir,
            acme=acme,
            spoa=spoa,
            haproxy=haproxy,
            metrics=metrics,
            daemon=daemon,
            certificates=certs,
            strict_permissions=strict_permissions,
            challenges=challenges,
            dns=self.dns_zones,
            fleet=fleet,
        )

    def _listen(self, s: _Section, name: str, default: str) -> Listen:
        value = s.get(name, str, default)
        try:
            return parse_listen(value)
        except ValueError as e:
            raise s.error(name, str(e)) from None

    def _spoa(self, s: _Section) -> SpoaConfig:
        counts: dict[str, int] = {}
        for key, default in (("max_connections", 1000), ("max_pending_per_peer", 256)):
            counts[key] = s.get(key, int, default)
            if not 1 <= counts[key] <= 1_000_000:
                raise s.error(key, "must be between 1 and 1000000")
        return SpoaConfig(
            listen=self._listen(s, "listen", "127.0.0.1:12345"),
            hello_timeout=s.get_number("hello_timeout", 5.0, 0.0, 600.0),
            idle_timeout=s.get_number("idle_timeout", 30.0, 0.0, 86400.0),
            max_connections=counts["max_connections"],
            max_pending_per_peer=counts["max_pending_per_peer"],
        )

    def _acme(self, s: _Section) -> AcmeConfig:
        directory = s.get_str("directory", required=True)
        assert directory is not None
        directory = DIRECTORY_ALIASES.get(directory, directory)
        url = urlsplit(directory)
        loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
        if url.scheme != "https" and not (url.scheme == "http" and loopback):
            raise s.error(
                "directory",
                f"{directory!r} is not an https:// URL or one of "
                f"{', '.join(sorted(DIRECTORY_ALIASES))}",
            )
        if not url.hostname:
            raise s.error("directory", f"{directory!r} has no host")
        email = s.get_str("email")
        if email is not None and not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", email):
            raise s.error("email", f"{email!r} is not an e-mail address")
        ca_bundle = s.get_path("ca_bundle")
        if ca_bundle is not None and (problem := _readable_file(ca_bundle)):
            raise s.error("ca_bundle", problem)
        eab_kid = s.get_str("eab_kid")
        eab_hmac_key = s.get_str("eab_hmac_key")
        if (eab_kid is None) != (eab_hmac_key is None):
            missing = "eab_hmac_key" if eab_hmac_key is None else "eab_kid"
            raise s.error(missing, "is required when the other EAB key is set")
        if eab_hmac_key is not None:
            try:
                base64.urlsafe_b64decode(eab_hmac_key + "=" * (-len(eab_hmac_key) % 4))
            except ValueError:
                raise s.error("eab_hmac_key", "is not base64url") from None
        profile = s.get_str("profile")
        poll = s.get_number("poll_interval", 2.0, 0.0, 60.0)
        timeout = s.get_number("timeout", 30.0, 0.0, 3600.0)
        moc = s.get("max_concurrent_orders", int, 16)
        if not 1 <= moc <= 64:
            raise s.error("max_concurrent_orders", "must be between 1 and 64")
        trusted_roots = s.get_path("trusted_roots")
        if trusted_roots is not None:
            if problem := _readable_file(trusted_roots):
                raise s.error("trusted_roots", problem)
            from agent.chain import load_roots

            try:
                load_roots(trusted_roots)
            except ValueError as e:
                raise s.error("trusted_roots", f"{trusted_roots}: {e}") from None
        allow_leaf_only = bool(s.get("allow_leaf_only", bool, False))
        s.check_unknown()
        return AcmeConfig(
            directory=directory,
            email=email,
            ca_bundle=ca_bundle,
            eab_kid=eab_kid,
            eab_hmac_key=eab_hmac_key,
            profile=profile,
            poll_interval=poll,
            timeout=timeout,
            max_concurrent_orders=moc,
            trusted_roots=trusted_roots,
            allow_leaf_only=allow_leaf_only,
        )

    def _haproxy(self, s: _Section, state_dir: Path) -> HAProxyConfig:
        apis = s.get_str_list("runtime_api")
        for i, api in enumerate(apis):
            problem = _runtime_api_problem(api)
            if problem:
                raise ConfigError(self.file, f"{s.key('runtime_api')}[{i}]", problem)
            if api.startswith("unix:"):
                apis[i] = "unix:" + str(self.resolve(api[5:]))
        cert_dir = s.get_path("cert_dir", state_dir / "haproxy")
        assert cert_dir is not None
        crt_list = s.get_path("crt_list")
        verify: list[Listen] = []
        for i, v in enumerate(s.get_str_list("verify")):
            try:
                verify.append(parse_listen(v))
            except ValueError as e:
                raise ConfigError(self.file, f"{s.key('verify')}[{i}]", str(e)) from None
        reload_command = s.get_str_list("reload_command")
        if reload_command and not reload_command[0]:
            raise s.error("reload_command", "the program (first element) must not be empty")
        timeout = s.get_number("timeout", 5.0, 0.0, 600.0)
        bufsize = s.get("bufsize", int, 16384)
        if not 1024 <= bufsize <= 1048576:
            raise s.error("bufsize", "must be between 1024 and 1048576 (HAProxy's tune.bufsize)")
        s.check_unknown()
        return HAProxyConfig(
            cert_dir=cert_dir,
            runtime_api=tuple(apis),
            crt_list=crt_list,
            verify=tuple(verify),
            reload_command=tuple(reload_command),
            timeout=timeout,
            bufsize=bufsize,
        )

    def _challenges(self, s: _Section, haproxy: HAProxyConfig) -> ChallengesConfig:
        from agent.haproxy_api import check_map_name

        answer = s.get_str("answer", "spoe")
        if answer not in ANSWER_MODES:
            raise s.error("answer", f'{answer!r} is not "spoe" or "map"')
        map_name: str | None = None
        raw = s.get_str("map")
        if raw is not None:
            map_name = raw if raw.startswith("virt@") else str(self.resolve(raw))
            try:
                check_map_name(map_name)
            except ValueError as e:
                raise s.error("map", str(e)) from None
            if not map_name.startswith("virt@") and not Path(map_name).parent.is_dir():
                raise s.error(
                    "map",
                    f"directory {Path(map_name).parent} does not exist (the map file goes there)",
                )
        map_timeout = s.get_number("map_timeout", 10.0, 0.0, 600.0)
        s.check_unknown()
        if answer == "map" and not haproxy.runtime_api:
            raise ConfigError(
                self.file,
                "haproxy.runtime_api",
                'challenges.answer = "map" needs at least one runtime API (a stats socket at '
                "level admin): the agent puts tokens into HAProxy's map through it",
            )
        return ChallengesConfig(answer=str(answer), map=map_name, map_timeout=map_timeout)

    def _daemon(self, s: _Section, state_dir: Path) -> DaemonConfig:
        control = s.get_path("control_socket", state_dir / "control.sock")
        assert control is not None
        durations: dict[str, float] = {}
        for key, default in (
            ("check_interval", 3600),
            ("reconcile_interval", 30),
            ("retry_base", 60),
            ("retry_max", 6 * 3600),
        ):
            try:
                durations[key] = parse_duration(s.get(key, (int, float, str), default))
            except ValueError as e:
                raise s.error(key, str(e)) from None
        if durations["retry_max"] < durations["retry_base"]:
            raise s.error("retry_max", "must not be shorter than retry_base")
        interval = durations["check_interval"]
        log_format = s.get_str("log_format", "text")
        if log_format not in ("text", "json"):
            raise s.error("log_format", f'{log_format!r} is not "text" or "json"')
        s.check_unknown()
        return DaemonConfig(
            control_socket=control,
            check_interval=interval,
            log_format=str(log_format),
            reconcile_interval=durations["reconcile_interval"],
            retry_base=durations["retry_base"],
            retry_max=durations["retry_max"],
        )

    def _fleet(self, s: _Section) -> FleetConfig:
        url = s.get_str("redis")
        sentinels = s.get_str_list("sentinels")
        service = s.get_str("service")
        if (url is None) == (not sentinels):
            raise s.error("redis", "set either redis (a URL) or sentinels + service, not both")
        ca_file = s.get_path("ca_file")
        if url is not None:
            u = urlsplit(url)
            if u.scheme not in ("redis", "rediss", "unix"):
                raise s.error("redis", f"{url!r} is not a redis://, rediss:// or unix:// URL")
            if u.password:
                raise s.error("redis", "holds a password: put it in password_file")
            if u.scheme == "unix" and not u.path:
                raise s.error("redis", f"{url!r} names no socket path")
            if u.scheme != "unix" and not u.hostname:
                raise s.error("redis", f"{url!r} names no host")
            if ca_file is not None and u.scheme != "rediss":
                raise s.error("ca_file", "is only used with a rediss:// (TLS) URL")
            if service is not None:
                raise s.error("service", "is only used with sentinels")
        else:
            if service is None:
                raise s.error("service", "is required with sentinels (the monitored name)")
            if ca_file is not None:
                raise s.error("ca_file", "is only used with a rediss:// (TLS) URL")
        parsed: list[tuple[str, int]] = []
        for i, entry in enumerate(sentinels):
            try:
                listen = parse_listen(entry if ":" in entry else f"{entry}:26379")
            except ValueError as e:
                raise ConfigError(self.file, f"{s.key('sentinels')}[{i}]", str(e)) from None
            parsed.append((listen.host, listen.port))
        if ca_file is not None and (problem := _readable_file(ca_file)):
            raise s.error("ca_file", problem)
        password_file = s.get_path("password_file")
        if password_file is not None:
            if problem := _readable_file(password_file):
                raise s.error("password_file", problem)
            if not password_file.read_text(errors="replace").strip():
                raise s.error("password_file", f"{password_file} is empty")
        username = s.get_str("username")
        node = s.get_str("node") or socket.gethostname()
        if not _FLEET_NAME.fullmatch(node):
            raise s.error("node", f"{node!r} is not a name of letters, digits, '.', '_', '-'")
        namespace = s.get_str("namespace", "haproxy-acme")
        assert namespace is not None
        if not _FLEET_NAME.fullmatch(namespace):
            raise s.error(
                "namespace", f"{namespace!r} is not a name of letters, digits, '.', '_', '-'"
            )
        secret_file = s.get_path("secret_file", required=True)
        assert secret_file is not None
        if problem := _secret_file_problem(secret_file):
            raise s.error("secret_file", problem)
        s.check_unknown()
        return FleetConfig(
            node=node,
            namespace=namespace,
            secret_file=secret_file,
            redis=url,
            sentinels=tuple(parsed),
            service=service,
            username=username,
            password_file=password_file,
            ca_file=ca_file,
        )

    def _certificates(self, top: _Section) -> tuple[CertificateConfig, ...]:
        items = top.get("certificates", list, [])
        certs: list[CertificateConfig] = []
        names: set[str] = set()
        for i, item in enumerate(items):
            prefix = f"certificates[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self.file, prefix, "expected a table ([[certificates]])")
            variants = self._certificate(_Section(self, prefix, item))
            # A dual certificate NAME stores its keys' certificates as NAME.rsa and
            # NAME.ecdsa (agent.layout.variant_name): those names are taken too.
            taken = {variants[0].group or variants[0].name, *(v.name for v in variants)}
            clash = sorted(taken & names)
            if clash:
                raise ConfigError(
                    self.file,
                    f"{prefix}.name",
                    f"duplicate certificate name {clash[0]!r}"
                    + (
                        ""
                        if clash[0] == (variants[0].group or variants[0].name)
                        else " (a certificate with `keys` stores its keys' certificates as "
                        "NAME.rsa and NAME.ecdsa)"
                    ),
                )
            names |= taken
            certs.extend(variants)
        return tuple(certs)

    def _dns_zones(self, top: _Section) -> tuple[DnsZoneConfig, ...]:
        items = top.get("dns", list, [])
        zones: list[DnsZoneConfig] = []
        for i, item in enumerate(items):
            prefix = f"dns[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self.file, prefix, "expected a table ([[dns]])")
            zone = self._dns_zone(_Section(self, prefix, item))
            if zone.zone in {z.zone for z in zones}:
                raise ConfigError(self.file, f"{prefix}.zone", f"duplicate zone {zone.zone!r}")
            zones.append(zone)
        return tuple(zones)

    def _dns_zone(self, s: _Section) -> DnsZoneConfig:
        raw_zone = s.get_str("zone", required=True)
        assert raw_zone is not None
        try:
            zone = validate_domain(raw_zone.rstrip("."))
        except ValueError as e:
            raise s.error("zone", str(e)) from None
        hook = s.get_str_list("hook")
        if s.has("hook") and (not hook or not hook[0]):
            raise s.error("hook", "the program (first element) must not be empty")
        server: Listen | None = None
        if s.has("server"):
            raw = s.get_str("server")
            assert raw is not None
            try:
                server = parse_listen(raw if ":" in raw else raw + ":53")
            except ValueError as e:
                raise s.error("server", str(e)) from None
        key_name = s.get_str("tsig_key_name")
        algorithm = s.get_str("tsig_algorithm", "hmac-sha256")
        assert algorithm is not None
        if algorithm.lower().rstrip(".") not in TSIG_ALGORITHMS:
            raise s.error(
                "tsig_algorithm", f"{algorithm!r} is not one of {', '.join(TSIG_ALGORITHMS)}"
            )
        secret_file = s.get_path("tsig_secret_file")
        if hook and (server or key_name or secret_file):
            raise s.error("hook", "use either hook or server + tsig_* keys, not both")
        # None of server/tsig_*/hook: a lookup-only zone (dns-persist-01 checks its records;
        # dns-01 cannot publish there, refused in _certificate).
        if not hook and (server or key_name or secret_file):
            for key, value in (
                ("server", server),
                ("tsig_key_name", key_name),
                ("tsig_secret_file", secret_file),
            ):
                if value is None:
                    raise s.error(key, "is required (or set hook = [...] for a hook program)")
            assert secret_file is not None
            if problem := _readable_file(secret_file):
                raise s.error("tsig_secret_file", problem)
            if secret_file.stat().st_mode & 0o077:
                raise s.error(
                    "tsig_secret_file",
                    f"{secret_file} is readable by group or others (chmod 600 it)",
                )
        checks: list[Listen] = []
        for j, v in enumerate(s.get_str_list("check_servers")):
            try:
                checks.append(parse_listen(v if ":" in v else v + ":53"))
            except ValueError as e:
                raise ConfigError(self.file, f"{s.key('check_servers')}[{j}]", str(e)) from None
        hook_timeout = s.get_number("hook_timeout", 30.0, 0.0, 3600.0)
        propagation = s.get_number("propagation_timeout", 120.0, 0.0, 3600.0)
        s.check_unknown()
        return DnsZoneConfig(
            zone=zone,
            server=server,
            tsig_key_name=key_name,
            tsig_algorithm=algorithm.lower().rstrip("."),
            tsig_secret_file=secret_file,
            hook=tuple(hook),
            hook_timeout=hook_timeout,
            check_servers=tuple(checks),
            propagation_timeout=propagation,
        )

    def _key_entry(
        self, s: _Section, domains: list[str], default_type: str | None
    ) -> _KeyEntry:
        """One key: `key`, `generate_key`, `key_type`, `csr` of table `s` (a
        [[certificates]] table, or one table of its `keys` list). `default_type`
        None: `key_type` is taken from the existing key file, and is required to
        create one."""
        key_path = s.get_path("key", required=True)
        assert key_path is not None
        generate_key = s.get("generate_key", bool, False)
        key_type_given = s.has("key_type")
        key_type = s.get_str("key_type", default_type)
        if key_type is not None and key_type not in keys.KEY_TYPES:
            raise s.error("key_type", f"{key_type!r} is not one of {', '.join(keys.KEY_TYPES)}")

        facts: keys.KeyFileFacts | None = None
        if not generate_key or key_path.exists():
            try:
                facts = keys.key_file_facts(key_path, self.key_cache.get(str(key_path)))
            except keys.StableKeyError as e:
                missing = not key_path.exists() and not generate_key
                hint = " (set generate_key = true to create it)" if missing else ""
                raise s.error("key", str(e) + hint) from None
            if key_type_given and _KEY_TYPE_OF.get(facts.kind, facts.kind) != key_type:
                raise s.error(
                    "key_type",
                    f"is {key_type!r} but {key_path} holds a {facts.kind} key",
                )
        else:
            parent = key_path.parent
            if not parent.is_dir():
                raise s.error(
                    "key", f"directory {parent} does not exist (needed to create the key)"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise s.error(
                    "key", f"directory {parent} is not writable (needed to create the key)"
                )

        csr_path = s.get_path("csr")
        if csr_path is not None:
            problem = _readable_file(csr_path)
            if problem:
                raise s.error("csr", problem)
            try:
                csr = keys.load_csr(csr_path)
            except keys.CSRError as e:
                raise s.error("csr", str(e)) from None
            if facts is not None and keys.spki_pin(csr.public_key()) != facts.pin:  # type: ignore[arg-type]
                raise s.error(
                    "csr", f"{csr_path} was not made from the key {key_path} (public keys differ)"
                )
            csr_names = keys.csr_domains(csr)
            if sorted(csr_names) != sorted(domains):
                raise s.error(
                    "csr",
                    f"names in {csr_path} ({', '.join(sorted(csr_names)) or 'none'}) differ "
                    f"from domains ({', '.join(sorted(domains))})",
                )

        if key_type is None:
            if facts is None:
                raise s.error("key_type", "is required to create the key (generate_key = true)")
            key_type = _KEY_TYPE_OF.get(facts.kind, facts.kind)
        return _KeyEntry(key_path, generate_key, key_type, csr_path, facts)

    def _key_list(self, s: _Section, name: str, domains: list[str]) -> list[_KeyEntry]:
        """`keys = [{ key = ..., key_type = ... }, ...]`: one key per kind (RSA, ECDSA)."""
        raw = s.get("keys", list)
        if not raw:
            raise s.error("keys", "must list at least one key ({ key = \"...\", key_type = ... })")
        entries: list[_KeyEntry] = []
        for j, item in enumerate(raw):
            prefix = f"{s.key('keys')}[{j}]"
            if not isinstance(item, dict):
                raise ConfigError(
                    self.file, prefix, f"expected a table {{ key = ... }}, got {_toml_type(item)}"
                )
            sub = _Section(self, prefix, item)
            entry = self._key_entry(sub, domains, default_type=None)
            # Each key type rolls on its own (its own next key and KeyState).
            next_key, generate_next = self._next_key(
                sub, entry.path, entry.facts, entry.key_type, name, f" ({entry.key_type} key)"
            )
            if (next_key is not None or generate_next) and entry.csr is not None:
                raise sub.error(
                    "next_key" if next_key is not None else "generate_next_key",
                    "a key rollover orders with CSRs the agent builds: remove csr",
                )
            entry = replace(entry, next_key=next_key, generate_next_key=generate_next)
            sub.check_unknown()
            for k, other in enumerate(entries):
                if other.kind == entry.kind:
                    raise ConfigError(
                        self.file,
                        prefix,
                        f"a second {entry.kind.upper()} key ({entry.key_type}; keys[{k}] is "
                        f"{other.key_type}): list one key per type, RSA and ECDSA",
                    )
                if other.path.resolve() == entry.path.resolve():
                    raise ConfigError(
                        self.file, f"{prefix}.key", f"{entry.path} is also keys[{k}].key"
                    )
            entries.append(entry)
        return entries

    def _certificate(self, s: _Section) -> tuple[CertificateConfig, ...]:
        name = s.get_str("name", required=True)
        assert name is not None
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", name) or ".." in name:
            raise s.error(
                "name",
                f"{name!r} is not a safe name (letters, digits, '.', '_', '-'; no '/' or '..'; "
                "it names files in the state directory)",
            )
        challenge = s.get_str("challenge", "http-01")
        assert challenge is not None
        if challenge not in ("http-01", "dns-01", "dns-persist-01"):
            raise s.error(
                "challenge", f'{challenge!r} is not "http-01", "dns-01" or "dns-persist-01"'
            )
        raw_domains = s.get("domains", list, required=True)
        if not raw_domains:
            raise s.error("domains", "must list at least one domain")
        domains: list[str] = []
        for j, d in enumerate(raw_domains):
            dkey = f"{s.key('domains')}[{j}]"
            if not isinstance(d, str):
                raise ConfigError(self.file, dkey, f"expected a string, got {_toml_type(d)}")
            try:
                norm = validate_domain(d, wildcard_ok=challenge != "http-01")
            except ValueError as e:
                raise ConfigError(self.file, dkey, str(e)) from None
            holder = _zone_holding(self.dns_zones, norm)
            if challenge == "dns-01" and holder is None:
                raise ConfigError(
                    self.file,
                    dkey,
                    f"{norm!r} uses challenge dns-01 but no [[dns]] zone holds it "
                    f"(zones: {', '.join(z.zone for z in self.dns_zones) or 'none'})",
                )
            if challenge == "dns-01" and holder is not None and not (holder.server or holder.hook):
                raise ConfigError(
                    self.file,
                    dkey,
                    f"{norm!r} uses challenge dns-01 but its [[dns]] zone {holder.zone!r} has "
                    "neither server + tsig_* keys nor a hook to publish records with",
                )
            if norm in domains:
                raise ConfigError(self.file, dkey, f"duplicate domain {norm!r}")
            domains.append(norm)
        # ACME (and Let's Encrypt) cap an order at 100 names.
        if len(domains) > 100:
            raise s.error("domains", "at most 100 domains per certificate")

        if s.has("keys"):
            for single in ("key", "generate_key", "key_type", "csr"):
                if s.has(single):
                    raise s.error(
                        single,
                        "a certificate with `keys` (one key per type) sets it per key, "
                        "inside `keys`",
                    )
            variants = self._key_list(s, name, domains)
        else:
            variants = [self._key_entry(s, domains, default_type="ec256")]

        pins = s.get_str_list("backup_pins")
        for j, pin in enumerate(pins):
            key_j = f"{s.key('backup_pins')}[{j}]"
            if not keys.valid_pin(pin):
                raise ConfigError(
                    self.file, key_j, f"{pin!r} is not a base64 SHA-256 pin (44 characters)"
                )
            if pin in pins[:j]:
                raise ConfigError(self.file, key_j, f"duplicate pin {pin!r}")

        dhparam = s.get_path("dhparam")
        if dhparam is not None:
            problem = _readable_file(dhparam)
            if problem:
                raise s.error("dhparam", problem)
            if b"-----BEGIN DH PARAMETERS-----" not in dhparam.read_bytes():
                raise s.error("dhparam", f"{dhparam} holds no PEM DH PARAMETERS block")

        renew_before: float | None = None
        if s.has("renew_before"):
            raw = s.get("renew_before", (str, int, float))
            try:
                renew_before = parse_duration(raw)
            except ValueError as e:
                raise s.error("renew_before", str(e)) from None
        allow_leaf_only: bool | None = s.get("allow_leaf_only", bool, None)
        dual = len(variants) > 1 or s.has("keys")
        if dual:
            for rkey in ("next_key", "generate_next_key"):
                if s.has(rkey):
                    raise s.error(
                        rkey,
                        "a certificate with `keys` (one key per type) rolls each key on its "
                        f"own: set {rkey} inside `keys`, in the entry of the key it replaces",
                    )
        else:
            v0 = variants[0]
            next_key, generate_next_key = self._next_key(
                s, v0.path, v0.facts, v0.key_type, name, ""
            )
            if (next_key is not None or generate_next_key) and v0.csr is not None:
                raise s.error(
                    "next_key" if next_key is not None else "generate_next_key",
                    "a key rollover orders with CSRs the agent builds: remove csr",
                )
            variants = [replace(v0, next_key=next_key, generate_next_key=generate_next_key)]
        rollover_durations: dict[str, float] = {}
        for dkey in ("announce_for", "previous_pin_for"):
            try:
                rollover_durations[dkey] = parse_duration(s.get(dkey, (str, int, float), "60d"))
            except ValueError as e:
                raise s.error(dkey, str(e)) from None
        rollover_at: float | None = None
        if s.has("rollover_at"):
            try:
                rollover_at = parse_timestamp(s.get("rollover_at", (str, int, float, datetime)))
            except ValueError as e:
                raise s.error("rollover_at", str(e)) from None
        s.check_unknown()
        return tuple(
            CertificateConfig(
                name=layout.variant_name(name, v.kind) if dual else name,
                domains=tuple(domains),
                key=v.path,
                csr=v.csr,
                generate_key=v.generate,
                key_type=v.key_type,
                backup_pins=tuple(pins),
                dhparam=dhparam,
                renew_before=renew_before,
                allow_leaf_only=allow_leaf_only,
                challenge=challenge,
                group=name if dual else None,
                key_kind=v.kind if dual else None,
                key_facts=v.facts,
                next_key=v.next_key,
                generate_next_key=v.generate_next_key,
                announce_for=rollover_durations["announce_for"],
                previous_pin_for=rollover_durations["previous_pin_for"],
                rollover_at=rollover_at,
            )
            for v in variants
        )

    def _next_key(
        self,
        s: _Section,
        key_path: Path,
        facts: keys.KeyFileFacts | None,
        key_type: str,
        cert_name: str,
        which: str,
    ) -> tuple[Path | None, bool]:
        """(next_key, generate_next_key), checked: an existing next key must be
        readable, supported, of the certificate's key type and not the key itself;
        a missing one needs generate_next_key and a writable directory.

        With [fleet], generate_next_key is refused before anything else is
        checked: each node would create its own next key, so the nodes would
        announce different pins and, after the switch, hold keys that do not
        match the certificate the ordering node obtained. `which` names the
        key of a `keys` entry in that message (" (rsa4096 key)"), or is ""."""
        generate = bool(s.get("generate_next_key", bool, False))
        if generate and self.fleet_configured:
            raise s.error(
                "generate_next_key",
                f"refused for certificate {cert_name!r}{which} with [fleet]: each node "
                "would create its own next key, announce its own pin, and after the "
                "switch hold a key that does not match the certificate the ordering "
                "node obtained. Remove generate_next_key and set next_key to a key file "
                "created once and copied to every node at the same path (mode 0600) "
                "before announce_for ends",
            )
        next_key = s.get_path("next_key")
        if next_key is None:
            if generate:
                self._check_creatable(s, "generate_next_key", key_path.parent)
            return None, generate
        if next_key.exists() and key_path.exists() and os.path.samefile(next_key, key_path):
            raise s.error("next_key", f"{next_key} is the certificate's key itself ({key_path})")
        if not next_key.exists():
            if not generate:
                how = (
                    "in a fleet: create it once and copy it to every node at this path, mode 0600"
                    if self.fleet_configured
                    else "set generate_next_key = true to create it"
                )
                raise s.error("next_key", f"file {next_key} does not exist ({how})")
            self._check_creatable(s, "next_key", next_key.parent)
            return next_key, generate
        problem = _readable_file(next_key)
        if problem:
            raise s.error("next_key", problem)
        try:
            nk = keys.load_private_key(next_key)
        except keys.StableKeyError as e:
            raise s.error("next_key", str(e)) from None
        want = _KEY_TYPE_OF.get(facts.kind, facts.kind) if facts is not None else key_type
        nk_type = _KEY_TYPE_OF.get(keys.describe_key(nk), keys.describe_key(nk))
        if nk_type != want:
            raise s.error(
                "next_key",
                f"{next_key} holds a {keys.describe_key(nk)} key, not {want!r} like the "
                f"certificate's key (a rollover keeps the key type)",
            )
        if facts is not None and keys.spki_pin(nk) == facts.pin:
            raise s.error("next_key", f"{next_key} holds the same key as {key_path}")
        return next_key, generate

    def _check_creatable(self, s: _Section, name: str, parent: Path) -> None:
        if not parent.is_dir():
            raise s.error(name, f"directory {parent} does not exist (needed to create the key)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise s.error(name, f"directory {parent} is not writable (needed to create the key)")


def parse_timestamp(value: object) -> float:
    """UNIX seconds from a TOML offset date-time, an ISO 8601 string with a UTC
    offset ("2027-03-01T00:00:00Z") or a number of UNIX seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a date-time like 2027-03-01T00:00:00Z")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not a date-time like 2027-03-01T00:00:00Z") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset (e.g. 2027-03-01T00:00:00Z)")
        return value.timestamp()
    raise ValueError("expected a date-time like 2027-03-01T00:00:00Z")


def _zone_holding(zones: tuple[DnsZoneConfig, ...], name: str) -> DnsZoneConfig | None:
    """The longest zone holding `name` (agent.dns01.zone_for uses the same rule)."""
    bare = name.removeprefix("*.")
    holding = [z for z in zones if bare == z.zone or bare.endswith("." + z.zone)]
    return max(holding, key=lambda z: len(z.zone), default=None)


_FLEET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
FLEET_SECRET_LENGTH = 32  # bytes (AES-256-GCM key), agent.store_redis.SECRET_LENGTH


def _secret_file_problem(path: Path) -> str | None:
    """What is wrong with the fleet secret file, or None (reads it, changes nothing)."""
    if problem := _readable_file(path):
        return problem
    st = path.stat()
    if st.st_mode & 0o077:
        return f"{path} is open to others (mode {st.st_mode & 0o777:04o}): run `chmod 600 {path}`"
    if st.st_size != FLEET_SECRET_LENGTH:
        return (
            f"{path} holds {st.st_size} bytes, not {FLEET_SECRET_LENGTH}: create it once with "
            f"`head -c {FLEET_SECRET_LENGTH} /dev/urandom > {path}` and copy it to every node"
        )
    return None


def _not_a_directory(path: Path) -> str | None:
    """ "... is not a directory" when `path`, or its nearest existing ancestor, is no directory."""
    cur = path
    while not cur.exists() and cur != cur.parent:
        cur = cur.parent
    if cur.exists() and not cur.is_dir():
        if cur == path:
            return f"{path} exists and is not a directory"
        return f"{path} cannot be created: {cur} is not a directory"
    return None


# keys.describe_key -> key_type
_KEY_TYPE_OF = {
    "RSA 2048": "rsa2048",
    "RSA 3072": "rsa3072",
    "RSA 4096": "rsa4096",
    "ECDSA P-256": "ec256",
    "ECDSA P-384": "ec384",
}


def key_checks_path(state_dir: Path) -> Path:
    """The cache of full key file checks (`keys.read_key_checks`) that `run` keeps."""
    return Path(state_dir) / "key-checks.json"


def save_key_checks(config: Config) -> bool:
    """Write the facts of every key `config` checked as the cache the next
    `load_config(..., cached_key_checks=True)` reads, if they differ from it.
    Call after the start-up checks passed (it writes into the state dir).
    Returns whether it wrote."""
    facts = {str(c.key): c.key_facts for c in config.certificates if c.key_facts is not None}
    path = key_checks_path(config.state_dir)
    old = keys.read_key_checks(path)
    if {p: (f.identity, f.kind, f.pin) for p, f in old.items()} == {
        p: (f.identity, f.kind, f.pin) for p, f in facts.items()
    }:
        return False
    keys.write_key_checks(path, facts)
    return True


def _runtime_api_problem(api: str) -> str | None:
    if api.startswith("unix:"):
        if not api[5:]:
            return f"{api!r}: empty socket path"
        return None
    if api.startswith("tcp:"):
        try:
            parse_listen(api[4:])
        except ValueError as e:
            return f"{api!r}: {e}"
        return None
    return f'{api!r} is not "unix:/path/to/socket" or "tcp:host:port"'


def load_config(path: str | os.PathLike[str], *, cached_key_checks: bool = False) -> Config:
    """Read and validate the config at `path`; raise ConfigError on any problem. Writes nothing.

    Every key file is checked fully (read and parsed). With `cached_key_checks`
    (the daemon's start and reload), a key file whose identity is the one a
    full check recorded in `key_checks_path(state_dir)` (`save_key_checks`)
    is only stat'ed: same checks, without parsing 10,000 keys at every start.
    """
    return _Loader(Path(path), cached_key_checks).load()
