"""Chain checks before install (agent.chain through check_certificate and a renewal run)."""

from __future__ import annotations

import datetime
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.certstate import load_current
from agent.chain import ChainPolicy
from agent.challenges import MemoryChallengeRegistry
from agent.config import ConfigError, load_config
from agent.issuer import IssuedCertificate
from agent.renewal import CertificateRejected, Renewer, check_certificate
from agent.storage import FileStorage
from tests.support.issued import TinyCA

DAY = 86400.0
CA = TinyCA()
OTHER_CA = TinyCA()
KEY = ec.generate_private_key(ec.SECP256R1())
T = time.time()
DOMAINS = ["a.example.com"]


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def leaf() -> x509.Certificate:
    return CA.leaf(KEY, DOMAINS, T - 60, T + 90 * DAY)


TRUST_CA = ChainPolicy(trusted_roots=(CA.root,))


def check(data: bytes, policy: ChainPolicy, name: str = "www") -> None:
    check_certificate(data, KEY, DOMAINS, [], T, policy=policy, name=name)


def test_leaf_only_answer_is_refused_naming_the_certificate_and_the_fix() -> None:
    with pytest.raises(CertificateRejected) as e:
        check(pem(leaf()), TRUST_CA)
    assert "'www'" in str(e.value)
    assert "only the leaf" in str(e.value)
    assert "allow_leaf_only = true" in str(e.value)


def test_leaf_only_answer_is_accepted_when_the_config_allows_it() -> None:
    check(pem(leaf()), ChainPolicy(trusted_roots=(CA.root,), allow_leaf_only=True))


def test_leaf_signed_directly_by_a_trusted_root_needs_no_chain() -> None:
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, DOMAINS[0])]))
        .issuer_name(CA.root.subject)
        .public_key(KEY.public_key())
        .serial_number(7)
        .not_valid_before(datetime.datetime.fromtimestamp(T - 60, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(T + DAY, datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAINS[0])]), False)
        .sign(CA.root_key, hashes.SHA256())
    )
    check(pem(cert), TRUST_CA)


def test_chain_without_the_leafs_issuer_is_refused_naming_the_missing_issuer() -> None:
    # The leaf is issued by the intermediate, but the CA sent the root instead.
    with pytest.raises(CertificateRejected) as e:
        check(pem(leaf(), CA.root), TRUST_CA)
    assert "the leaf's issuer CN=tiny intermediate is not in the chain" in str(e.value)


def test_intermediate_of_another_ca_with_the_same_name_is_refused_by_signature() -> None:
    # Same issuer NAME, wrong key: only the signature check catches it.
    with pytest.raises(CertificateRejected, match="is not signed by"):
        check(pem(leaf(), OTHER_CA.intermediate), ChainPolicy(trusted_roots=(OTHER_CA.root,)))


def test_chain_not_leading_to_a_configured_root_is_refused() -> None:
    with pytest.raises(CertificateRejected) as e:
        check(pem(leaf(), CA.intermediate), ChainPolicy(trusted_roots=(OTHER_CA.root,)))
    assert "does not lead to a root of [acme] trusted_roots" in str(e.value)


def test_chain_leading_to_a_configured_root_passes_with_or_without_the_root() -> None:
    check(pem(leaf(), CA.intermediate), TRUST_CA)
    check(pem(leaf(), CA.intermediate, CA.root), TRUST_CA)


def test_without_trusted_roots_an_unknown_private_issuer_is_refused() -> None:
    # TinyCA's root is in no system trust store: the chain may be incomplete.
    with pytest.raises(CertificateRejected) as e:
        check(pem(leaf(), CA.intermediate), ChainPolicy())
    assert "set [acme] trusted_roots" in str(e.value)


def test_without_trusted_roots_a_chain_ending_in_its_own_root_passes() -> None:
    check(pem(leaf(), CA.intermediate, CA.root), ChainPolicy())


def test_trusted_roots_must_be_a_pem_certificate_file(tmp_path: Path) -> None:
    (tmp_path / "roots.pem").write_text("not a certificate\n")
    (tmp_path / "c.toml").write_text(
        '[acme]\ndirectory = "https://127.0.0.1:1/dir"\ntrusted_roots = "roots.pem"\n'
    )
    with pytest.raises(ConfigError, match=r"acme\.trusted_roots: .*no PEM certificate"):
        load_config(tmp_path / "c.toml")


class LeafOnlyIssuer:
    """A CA that answers the leaf alone (the defect: installed and served without a chain)."""

    renewal_info_url = None

    def connect(self) -> None:
        pass

    def renewal_info(self, cert: x509.Certificate, previous: object = None) -> None:
        return None

    def issue(
        self,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None = None,
        *,
        challenge: str = "http-01",
        cert_name: str | None = None,
    ) -> IssuedCertificate:
        csr = x509.load_pem_x509_csr(csr_pem)
        now = time.time()
        cert = CA.leaf(csr.public_key(), list(domains), now - 60, now + 90 * DAY)  # type: ignore[arg-type]
        return IssuedCertificate(pem(cert).decode(), "http://ca/order/1")


def _config(tmp_path: Path, extra_cert: str = "") -> Path:
    (tmp_path / "roots.pem").write_bytes(pem(CA.root))
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            """\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [[certificates]]
            name = "www"
            domains = ["a.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
        + extra_cert
    )
    return path


def test_renewal_refuses_a_leaf_only_answer_and_installs_nothing(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    renewer = Renewer(config, MemoryChallengeRegistry(), issuer=LeafOnlyIssuer())
    [result] = renewer.run(None, force=False, dry_run=False)
    assert result.status == "failed"
    assert result.error_type == "rejected"
    assert "certificate 'www'" in result.reason and "allow_leaf_only = true" in result.reason
    assert load_current(FileStorage(config.state_dir), "www") is None


def test_per_certificate_allow_leaf_only_lets_the_renewal_install(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "allow_leaf_only = true\n"))
    assert config.certificate("www").allow_leaf_only is True
    renewer = Renewer(config, MemoryChallengeRegistry(), issuer=LeafOnlyIssuer())
    [result] = renewer.run(None, force=False, dry_run=False)
    assert result.status == "renewed", result.reason
