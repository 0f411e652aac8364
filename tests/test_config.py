"""Config loading: defaults, path resolution, and every rejection naming file and key."""

from __future__ import annotations

import base64
import os
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import keys
from agent.config import ConfigError, load_config, parse_duration, parse_listen, validate_domain

PIN = base64.b64encode(b"\x01" * 32).decode()


_EC_KEY = ec.generate_private_key(ec.SECP256R1())
_RSA_KEY = rsa.generate_private_key(65537, 2048)  # once per session: RSA generation is slow
_RSA_CSR = keys.csr_pem(keys.build_csr(_RSA_KEY, ["b.example.com", "a.example.com"]))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with an EC key, an RSA key, and a CSR for the RSA key."""
    (tmp_path / "ec.key").write_bytes(keys.private_key_pem(_EC_KEY))
    (tmp_path / "rsa.key").write_bytes(keys.private_key_pem(_RSA_KEY))
    (tmp_path / "rsa.csr").write_bytes(_RSA_CSR)
    return tmp_path


def write(site: Path, body: str, name: str = "config.toml") -> Path:
    path = site / name
    path.write_text(textwrap.dedent(body))
    return path


BASE = """\
state_dir = "state"
[acme]
directory = "https://127.0.0.1:14000/dir"
"""


def test_minimal_config_gets_documented_defaults(site: Path) -> None:
    cfg = load_config(write(site, BASE))
    assert cfg.state_dir == site / "state"
    assert cfg.acme.poll_interval == 2.0  # the cap of the adaptive polling
    assert cfg.acme.timeout == 30.0
    assert cfg.acme.max_concurrent_orders == 16
    assert str(cfg.spoa.listen) == "127.0.0.1:12345"
    assert str(cfg.metrics.listen) == "127.0.0.1:9810"
    assert cfg.haproxy.cert_dir == site / "state" / "haproxy"
    assert cfg.haproxy.runtime_api == ()
    assert cfg.haproxy.crt_list is None
    assert cfg.daemon.control_socket == site / "state" / "control.sock"
    assert cfg.daemon.check_interval == 3600
    assert cfg.daemon.log_format == "text"
    assert cfg.certificates == ()


def test_full_config_resolves_relative_paths_against_the_config_dir(site: Path) -> None:
    (site / "dh.pem").write_text(
        "-----BEGIN DH PARAMETERS-----\nMIIB\n-----END DH PARAMETERS-----\n"
    )
    (site / "ca.pem").write_text("x")
    cfg = load_config(
        write(
            site,
            f"""\
            state_dir = "state"
            [acme]
            directory = "letsencrypt-staging"
            email = "ops@example.com"
            ca_bundle = "ca.pem"
            eab_kid = "kid-1"
            eab_hmac_key = "c2VjcmV0"
            profile = "shortlived"
            poll_interval = 0.1
            max_concurrent_orders = 8
            [spoa]
            listen = "[::1]:12346"
            [haproxy]
            runtime_api = ["unix:run/admin.sock", "tcp:127.0.0.1:9999"]
            cert_dir = "certs"
            crt_list = "certs/list.txt"
            verify = ["127.0.0.1:8443"]
            reload_command = ["systemctl", "reload", "haproxy"]
            [daemon]
            check_interval = "1h"
            log_format = "json"
            [[certificates]]
            name = "www"
            domains = ["WWW.example.com", "example.com"]
            key = "ec.key"
            backup_pins = ["{PIN}"]
            dhparam = "dh.pem"
            renew_before = "30d"
            [[certificates]]
            name = "byo"
            domains = ["a.example.com", "b.example.com"]
            key = "rsa.key"
            csr = "rsa.csr"
            """,
        )
    )
    assert cfg.acme.directory == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert cfg.acme.ca_bundle == site / "ca.pem"
    assert cfg.spoa.listen.host == "::1" and cfg.spoa.listen.port == 12346
    assert cfg.haproxy.runtime_api == (f"unix:{site}/run/admin.sock", "tcp:127.0.0.1:9999")
    assert cfg.haproxy.cert_dir == site / "certs"
    assert cfg.haproxy.crt_list == site / "certs" / "list.txt"
    assert cfg.haproxy.reload_command == ("systemctl", "reload", "haproxy")
    assert cfg.daemon.check_interval == 3600
    www = cfg.certificate("www")
    assert www.domains == ("www.example.com", "example.com")
    assert www.key == site / "ec.key"
    assert www.renew_before == 30 * 86400
    assert www.backup_pins == (PIN,)
    assert cfg.certificate("byo").csr == site / "rsa.csr"


def cert_block(**fields: str) -> str:
    body = {"name": '"www"', "domains": '["www.example.com"]', "key": '"ec.key"'}
    body.update(fields)
    lines = [f"{k} = {v}" for k, v in body.items() if v != "<omit>"]
    return "[[certificates]]\n" + "\n".join(lines) + "\n"


INVALID = [
    # (extra toml, expected key, expected message fragment)
    ("bogus = 1\n", "acme.bogus", "unknown key"),
    ('[spoa]\nlisten = "127.0.0.1"\n', "spoa.listen", "host:port"),
    ('[spoa]\nlisten = "127.0.0.1:70000"\n', "spoa.listen", "out of range"),
    ("[spoa]\nport = 1\n", "spoa.port", "unknown key"),
    ("poll_interval = 0\n", "acme.poll_interval", "greater than 0"),
    ("max_concurrent_orders = 0\n", "acme.max_concurrent_orders", "between 1 and 64"),
    (cert_block(key='"."'), "certificates[0].key", "not a regular file"),
    ('[haproxy]\nruntime_api = ["ftp:x"]\n', "haproxy.runtime_api[0]", "unix:"),
    ('[daemon]\nlog_format = "xml"\n', "daemon.log_format", "text"),
    ('[daemon]\ncheck_interval = "soon"\n', "daemon.check_interval", "not a duration"),
    (cert_block(key='"missing.key"'), "certificates[0].key", "does not exist"),
    (cert_block(key='"config.toml"'), "certificates[0].key", "not a readable private key"),
    (cert_block(extra="1"), "certificates[0].extra", "unknown key"),
    (cert_block(name='"../etc"'), "certificates[0].name", "not a safe name"),
    (cert_block(name='"a/b"'), "certificates[0].name", "not a safe name"),
    (cert_block(name="<omit>"), "certificates[0].name", "is required"),
    (cert_block(domains="[]"), "certificates[0].domains", "at least one"),
    (cert_block(domains='["-bad.example.com"]'), "certificates[0].domains[0]", "invalid label"),
    (cert_block(domains='["*.example.com"]'), "certificates[0].domains[0]", "wildcard"),
    (cert_block(domains='["localhost"]'), "certificates[0].domains[0]", "fully qualified"),
    (cert_block(domains='["127.0.0.1"]'), "certificates[0].domains[0]", "IP address"),
    (
        cert_block(domains='["a.example.com", "A.example.com"]'),
        "certificates[0].domains[1]",
        "duplicate domain",
    ),
    (cert_block() + cert_block(), "certificates[1].name", "duplicate certificate name"),
    (cert_block(renew_before='"30 days"'), "certificates[0].renew_before", "not a duration"),
    (cert_block(renew_before='"0d"'), "certificates[0].renew_before", "positive"),
    (cert_block(csr='"rsa.csr"'), "certificates[0].csr", "public keys differ"),
    (
        cert_block(key='"rsa.key"', csr='"rsa.csr"'),
        "certificates[0].csr",
        "differ from domains",
    ),
    (cert_block(csr='"nope.csr"'), "certificates[0].csr", "does not exist"),
    (cert_block(key_type='"rsa4096"'), "certificates[0].key_type", "holds a ECDSA P-256"),
    (cert_block(key_type='"dsa"'), "certificates[0].key_type", "not one of"),
    (cert_block(backup_pins='["abc"]'), "certificates[0].backup_pins[0]", "base64 SHA-256"),
    (cert_block(generate_key='"yes"'), "certificates[0].generate_key", "expected a boolean"),
    (cert_block(dhparam='"ec.key"'), "certificates[0].dhparam", "DH PARAMETERS"),
]


@pytest.mark.parametrize("extra, key, fragment", INVALID, ids=[i[1] + ":" + i[2] for i in INVALID])
def test_invalid_config_names_file_and_key(site: Path, extra: str, key: str, fragment: str) -> None:
    path = write(site, BASE + extra)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key
    assert fragment in e.value.message
    assert str(e.value).startswith(f"{path}: {key}: ")


def test_missing_acme_directory_is_required(site: Path) -> None:
    with pytest.raises(ConfigError, match=r"acme\.directory: is required"):
        load_config(write(site, "state_dir = 's'\n"))


def test_plain_http_directory_is_rejected_unless_loopback(site: Path) -> None:
    with pytest.raises(ConfigError, match=r"acme\.directory"):
        load_config(write(site, '[acme]\ndirectory = "http://ca.example.com/dir"\n'))
    assert load_config(write(site, '[acme]\ndirectory = "http://127.0.0.1:1/d"\n'))


def test_top_level_unknown_key_is_named(site: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.toml: stat_dir: unknown key"):
        load_config(write(site, 'stat_dir = "x"\n' + BASE))


def test_unreadable_key_file_is_reported(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite may run as root, which reads any file: take access() away instead of chmod.
    real_access = os.access
    target = site / "ec.key"
    monkeypatch.setattr(
        os, "access", lambda p, m: False if Path(p) == target else real_access(p, m)
    )
    path = write(site, BASE + cert_block())
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: certificates[0].key: file {target} is not readable"


def test_generate_key_allows_a_missing_key_and_writes_nothing(site: Path) -> None:
    cfg = load_config(write(site, BASE + cert_block(key='"new.key"', generate_key="true")))
    assert cfg.certificates[0].generate_key
    assert not (site / "new.key").exists()
    assert not (site / "state").exists()


def test_generate_key_needs_an_existing_directory(site: Path) -> None:
    with pytest.raises(ConfigError, match=r"certificates\[0\]\.key: directory .* does not exist"):
        load_config(write(site, BASE + cert_block(key='"no/such/new.key"', generate_key="true")))


def test_invalid_toml_and_missing_file(site: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(site, "[acme\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(site / "absent.toml")


def test_eab_needs_both_parts(site: Path) -> None:
    with pytest.raises(ConfigError, match=r"acme\.eab_hmac_key: is required"):
        load_config(write(site, BASE + 'eab_kid = "k"\n'))


@pytest.mark.parametrize(
    "text, seconds", [("30d", 2592000), ("12h", 43200), ("90m", 5400), ("3600s", 3600), (60, 60)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "1w", "-1d", "d", True, "1.5.2h"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_listen_forms() -> None:
    assert parse_listen("[::1]:80").host == "::1"
    assert parse_listen(":80").host == "127.0.0.1"
    with pytest.raises(ValueError, match="IPv6"):
        parse_listen("::1:80")


def test_domain_normalisation() -> None:
    assert validate_domain("WWW.Example.COM") == "www.example.com"
    with pytest.raises(ValueError, match="A-labels"):
        validate_domain("bücher.example")
    with pytest.raises(ValueError, match="trailing dot"):
        validate_domain("example.com.")
    assert validate_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"


def test_key_pem_in_traditional_format_is_accepted(site: Path) -> None:
    k = ec.generate_private_key(ec.SECP384R1())
    (site / "trad.key").write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cfg = load_config(write(site, BASE + cert_block(key='"trad.key"', key_type='"ec384"')))
    assert cfg.certificates[0].key_type == "ec384"


# --- the daemon's key check cache (load_config(cached_key_checks=True)) -------------------


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    parsed: list[str] = []
    real = keys.parse_private_key

    def counting(data: bytes, source: str) -> keys.PrivateKey:
        parsed.append(source)
        return real(data, source)

    monkeypatch.setattr(keys, "parse_private_key", counting)
    return parsed


def _saved(path: Path) -> None:
    from agent.config import save_key_checks

    cfg = load_config(path)
    (path.parent / "state").mkdir(mode=0o700, exist_ok=True)
    assert save_key_checks(cfg)


def test_unchanged_key_is_not_parsed_again_from_the_key_check_cache(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(site, BASE + cert_block())
    _saved(path)
    parsed = _count_parses(monkeypatch)
    cfg = load_config(path, cached_key_checks=True)
    assert parsed == []
    facts = cfg.certificates[0].key_facts
    assert facts is not None and facts.kind == "ECDSA P-256" and not facts.parsed
    assert facts.pin == keys.spki_pin(_EC_KEY)


def test_check_config_parses_every_key_even_with_a_cache(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(site, BASE + cert_block())
    _saved(path)
    parsed = _count_parses(monkeypatch)
    load_config(path)  # what check-config and renew call
    assert parsed == [str(site / "ec.key")]


def test_key_replaced_after_the_cache_was_written_is_checked_again(site: Path) -> None:
    path = write(site, BASE + cert_block())
    _saved(path)
    # Same size, garbage content: the identity (ctime, mtime) changes with the write.
    key_file = site / "ec.key"
    size = key_file.stat().st_size
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * (size - 28))
    with pytest.raises(ConfigError) as e:
        load_config(path, cached_key_checks=True)
    assert str(e.value).startswith(f"{path}: certificates[0].key: {key_file}: not a readable")


def test_key_type_mismatch_is_found_from_the_cache(site: Path) -> None:
    path = write(site, BASE + cert_block())
    _saved(path)
    path = write(site, BASE + cert_block(key_type='"rsa2048"'))
    with pytest.raises(ConfigError, match=r"certificates\[0\]\.key_type: .* ECDSA P-256 key"):
        load_config(path, cached_key_checks=True)


def test_csr_of_another_key_is_refused_from_the_cache(site: Path) -> None:
    domains = '["a.example.com", "b.example.com"]'
    path = write(site, BASE + cert_block(domains=domains))  # ec.key, checked and cached
    _saved(path)
    path = write(site, BASE + cert_block(domains=domains, csr='"rsa.csr"'))
    with pytest.raises(ConfigError, match=r"certificates\[0\]\.csr: .*\(public keys differ\)"):
        load_config(path, cached_key_checks=True)


def test_key_check_cache_holds_no_key_material_and_is_private(site: Path) -> None:
    from agent.config import key_checks_path

    path = write(site, BASE + cert_block())
    _saved(path)
    cache = key_checks_path(site / "state")
    raw = cache.read_bytes()
    der = _EC_KEY.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert b"PRIVATE" not in raw
    assert base64.b64encode(der)[:40] not in raw
    private_value = _EC_KEY.private_numbers().private_value
    assert str(private_value).encode() not in raw and format(private_value, "x").encode() not in raw
    assert cache.stat().st_mode & 0o777 == 0o600


def test_damaged_key_check_cache_means_a_full_check(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.config import key_checks_path

    path = write(site, BASE + cert_block())
    _saved(path)
    key_checks_path(site / "state").write_text("{not json")
    parsed = _count_parses(monkeypatch)
    load_config(path, cached_key_checks=True)
    assert parsed == [str(site / "ec.key")]
