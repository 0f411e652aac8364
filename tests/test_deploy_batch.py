"""The batch deploy path against a fake runtime API speaking HAProxy's prompt mode,
and the reconcile cache. The real HAProxy is in
tests/integration/test_deploy_batch_haproxy.py.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent import deploy as deploy_mod
from agent.deploy import Deployer, DeployTarget
from agent.haproxy_api import HAProxyConnectionError, RuntimeAPI, Session
from tests.support.certs import CA, make_bundle, make_ca


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca()


class PromptCLI:
    """A unix-socket runtime API in prompt mode, with HAProxy 2.6's one-transaction
    rule: stores (path -> serial), at most one open transaction (path, serial).

    Records every command per connection (`sessions`) and the transaction
    events in order (`events`: ("set", path), ("check", path), ("commit", path),
    ("abort", path)). `wrong_pending`: paths whose pending transaction reports
    a wrong serial (as if HAProxy had merged another payload into it).
    `die_after`: close every connection after that many commands.
    """

    def __init__(self, path: Path, loaded: dict[str, int]) -> None:
        self.path = path
        self.stores: dict[str, int | None] = dict(loaded)
        self.transaction: tuple[str, int] | None = None
        self.sessions: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.wrong_pending: set[str] = set()
        self.die_after: int | None = None
        self.open_at_set: list[tuple[str, str] | None] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        commands: list[str] = []
        self.sessions.append(commands)
        data = b""
        prompt = False
        while True:
            while b"\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            line, data = data.split(b"\n", 1)
            command = line.decode()
            payload = b""
            if command.endswith(" <<"):
                command = command[:-3]
                while b"\n\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                payload, data = data.split(b"\n\n", 1)
            commands.append(command)
            if self.die_after is not None and len(commands) > self.die_after:
                return
            if command == "prompt":
                prompt = True
                conn.sendall(b"\n> ")
                continue
            reply = self._answer(command, payload)
            conn.sendall(reply.encode() + (b"\n> " if prompt else b""))
            if not prompt:
                return

    def _answer(self, command: str, payload: bytes) -> str:
        words = command.split()
        if command == "show ssl cert":
            out = "# transaction\n"
            if self.transaction:
                out += f"*{self.transaction[0]}\n"
            return out + "# filename\n" + "".join(f"{p}\n" for p in self.stores) + "\n"
        if words[:3] == ["show", "ssl", "cert"]:
            path = words[3]
            if path.startswith("*"):
                self.events.append(("check", path[1:]))
                if self.transaction is None or self.transaction[0] != path[1:]:
                    return "No ongoing transaction!\n"
                serial = self.transaction[1] + (1 if path[1:] in self.wrong_pending else 0)
                return f"Filename: {path}\nStatus: Unused\nSerial: {serial:X}\n\n"
            if path not in self.stores:
                return "Can't display the certificate: Not found or the certificate is a bundle!\n"
            stored = self.stores[path]
            serial_line = f"Serial: {stored:X}\n" if stored is not None else ""
            return f"Filename: {path}\nStatus: Used\n{serial_line}\n"
        if words[:3] == ["new", "ssl", "cert"]:
            self.stores[words[3]] = None
            return f"New empty certificate store '{words[3]}'!\n"
        if words[:3] == ["set", "ssl", "cert"]:
            path = words[3]
            self.open_at_set.append(("open", self.transaction[0]) if self.transaction else None)
            self.events.append(("set", path))
            serial = x509.load_pem_x509_certificates(payload + b"\n")[0].serial_number
            if self.transaction is not None:  # 2.6: silently merged into the open one
                self.transaction = (self.transaction[0], serial)
                return f"Transaction updated for certificate {self.transaction[0]}!\n"
            self.transaction = (path, serial)
            return f"Transaction created for certificate {path}!\n"
        if words[:3] == ["commit", "ssl", "cert"]:
            assert self.transaction is not None and self.transaction[0] == words[3]
            self.events.append(("commit", words[3]))
            self.stores[words[3]] = self.transaction[1]
            self.transaction = None
            return f"Committing {words[3]}.\nSuccess!\n"
        if words[:3] == ["abort", "ssl", "cert"]:
            if self.transaction is None or self.transaction[0] != words[3]:
                return "No ongoing transaction!\n"
            self.events.append(("abort", words[3]))
            self.transaction = None
            return "Transaction aborted for certificate '{words[3]}'!\n"
        if words[:3] == ["add", "ssl", "crt-list"]:
            return "Inserting certificate\nSuccess!\n"
        if words[:3] == ["del", "ssl", "cert"]:
            self.stores.pop(words[3], None)
            return f"Certificate '{words[3]}' deleted!\n"
        if words[:3] == ["del", "ssl", "crt-list"]:
            return f"Entry '{words[4]}' deleted in crtlist '{words[3]}'!\n"
        return "Unknown command\n"


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _targets(ca: CA, names: list[str]) -> list[DeployTarget]:
    out = []
    for name in names:
        bundle, cert, _ = make_bundle(ca, [f"{name}.test"])
        out.append(DeployTarget(name, bundle, cert.serial_number, [f"{name}.test"]))
    return out


def _served(cli: PromptCLI, deployer: Deployer, targets: list[DeployTarget]) -> list[int | None]:
    return [cli.stores.get(str(deployer.path_for(t.name))) for t in targets]


def test_batch_is_one_pipelined_session_per_instance_with_the_pending_serial_checked(
    tmp_path: Path, ca: CA
) -> None:
    cert_dir = tmp_path / "certs"
    old = _targets(ca, ["a", "b", "c"])
    loaded = {str(cert_dir / f"{t.name}.pem"): t.serial for t in old}
    clis = [PromptCLI(tmp_path / f"admin{i}.sock", loaded) for i in range(2)]
    try:
        deployer = Deployer(
            [f"unix:{c.path}" for c in clis],
            cert_dir,
            crt_list=tmp_path / "crt-list.txt",
            probe_bufsize=False,
        )
        new = _targets(ca, ["a", "b", "c", "d"])  # three renewals and one new certificate

        results = deployer.deploy_batch(new)

        assert [r.errors for r in results] == [[], [], [], []]
        for cli in clis:
            # One connection for the whole batch (push, show pass), one listing.
            assert len(cli.sessions) == 1
            commands = cli.sessions[0]
            assert commands[0] == "prompt"
            assert commands.count("show ssl cert") == 1
            assert _served(cli, deployer, new) == [t.serial for t in new]
            # Per certificate: set, check of the pending serial, commit; the next
            # set only once the previous transaction is closed.
            paths = [str(deployer.path_for(t.name)) for t in new]
            assert cli.events == [(e, p) for p in paths for e in ("set", "check", "commit")]
            assert cli.open_at_set == [None] * 4
        # Every bundle is named in the crt-list file (for a restart), in one edit.
        assert (tmp_path / "crt-list.txt").read_text() == "".join(
            f"{cert_dir / t.name}.pem\n" for t in new
        )
    finally:
        for cli in clis:
            cli.close()


def test_a_certificate_named_twice_in_a_batch_goes_in_a_later_round_in_order(
    tmp_path: Path, ca: CA
) -> None:
    """Two targets for one bundle path never share a transaction round: the first
    one's round runs, then the second's, so the later target is what is served."""
    cert_dir = tmp_path / "certs"
    cli = PromptCLI(tmp_path / "admin.sock", {})
    try:
        deployer = Deployer([f"unix:{cli.path}"], cert_dir, crt_list=tmp_path / "crt-list.txt",
                            probe_bufsize=False)  # fmt: skip
        first_a, b = _targets(ca, ["a", "b"])
        [second_a] = _targets(ca, ["a"])
        results = deployer.deploy_batch([first_a, b, second_a])
        assert [r.errors for r in results] == [[], [], []]
        assert [r.name for r in results] == ["a", "b", "a"]
        path_a = str(deployer.path_for("a"))
        sets = [p for e, p in cli.events if e == "set"]
        assert sets.count(path_a) == 2 and sets[-1] == path_a  # a, b, then a again
        assert cli.stores[path_a] == second_a.serial
        assert cli.open_at_set == [None] * 3
    finally:
        cli.close()


def test_a_wrong_pending_serial_is_aborted_and_only_that_certificate_rolled_back(
    tmp_path: Path, ca: CA
) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    old = _targets(ca, ["a", "b", "c"])
    for t in old:
        (cert_dir / f"{t.name}.pem").write_bytes(t.bundle)
    cli = PromptCLI(
        tmp_path / "admin.sock", {str(cert_dir / f"{t.name}.pem"): t.serial for t in old}
    )
    try:
        deployer = Deployer([f"unix:{cli.path}"], cert_dir, probe_bufsize=False)
        cli.wrong_pending.add(str(cert_dir / "b.pem"))
        new = _targets(ca, ["a", "b", "c"])

        a, b, c = deployer.deploy_batch(new)

        assert a.ok and c.ok
        assert not b.ok and "pending transaction holds serial" in b.errors[0]
        b_path = str(cert_dir / "b.pem")
        assert ("abort", b_path) in cli.events and ("commit", b_path) not in cli.events
        assert _served(cli, deployer, new) == [new[0].serial, old[1].serial, new[2].serial]
        assert (cert_dir / "b.pem").read_bytes() == old[1].bundle
        assert (cert_dir / "a.pem").read_bytes() == new[0].bundle
        assert cli.transaction is None
        assert len(cli.sessions) == 1
    finally:
        cli.close()


def test_a_connection_dying_mid_batch_is_a_connection_error_naming_the_instance(
    tmp_path: Path, ca: CA
) -> None:
    cert_dir = tmp_path / "certs"
    cli = PromptCLI(tmp_path / "admin.sock", {})
    try:
        api = RuntimeAPI(f"unix:{cli.path}", timeout=2.0, probe_bufsize=False)
        cli.die_after = 3
        session = Session(api)
        with pytest.raises(HAProxyConnectionError) as caught:
            session.pipeline([(f"show ssl cert {cert_dir}/x{i}.pem", None) for i in range(5)])
        assert caught.value.instance == api.name and "closed" in str(caught.value)
        assert api.name in str(caught.value)
    finally:
        cli.close()


def test_reconcile_reparses_and_rereads_nothing_when_nothing_changed(
    tmp_path: Path, ca: CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_dir = tmp_path / "certs"
    bundles = {f"c{i}": make_bundle(ca, [f"c{i}.test"])[0] for i in range(6)}
    parses: list[str] = []
    reads: list[Path] = []
    real_inspect = deploy_mod.inspect_bundle
    real_read = Deployer._read_file

    def counting_inspect(name: str, bundle: bytes) -> x509.Certificate:
        parses.append(name)
        return real_inspect(name, bundle)

    def counting_read(self: Deployer, path: Path) -> bytes | None:
        reads.append(path)
        return real_read(self, path)

    monkeypatch.setattr(deploy_mod, "inspect_bundle", counting_inspect)
    monkeypatch.setattr(Deployer, "_read_file", counting_read)
    deployer = Deployer([], cert_dir)

    def stored() -> list[DeployTarget]:
        # As the daemon's pass builds them: fresh objects from the stored bytes.
        return [DeployTarget.from_bundle(n, bytes(b)) for n, b in bundles.items()]

    first = deployer.reconcile(stored())
    assert all(s.in_sync and s.pushed for s in first)
    assert sorted(set(parses)) == sorted(bundles)
    parses.clear()
    reads.clear()

    second = deployer.reconcile(stored())

    assert all(s.in_sync and not s.pushed for s in second)
    assert parses == [] and reads == []

    # A file changed behind our back is read (and repaired); nothing else is.
    (cert_dir / "c3.pem").write_bytes(bundles["c2"])
    third = deployer.reconcile(stored())
    assert parses == [] and reads == [cert_dir / "c3.pem"]
    assert [s.pushed for s in third] == [False, False, False, True, False, False]
    assert (cert_dir / "c3.pem").read_bytes() == bundles["c3"]

    # A renewed bundle is parsed once, then cached too.
    bundles["c1"] = make_bundle(ca, ["c1.test"])[0]
    reads.clear()
    deployer.reconcile(stored())
    deployer.reconcile(stored())
    assert parses == ["c1"]


def test_served_state_of_many_certificates_is_one_session(tmp_path: Path, ca: CA) -> None:
    cert_dir = tmp_path / "certs"
    targets = _targets(ca, [f"s{i}" for i in range(150)])  # more than one pipeline window
    cli = PromptCLI(
        tmp_path / "admin.sock",
        {str(cert_dir / f"{t.name}.pem"): t.serial for t in targets[:100]},
    )
    try:
        deployer = Deployer([f"unix:{cli.path}"], cert_dir, probe_bufsize=False)
        statuses = deployer.served(targets)
        assert [s.in_sync for s in statuses] == [True] * 100 + [False] * 50
        assert len(cli.sessions) == 1
        assert sum(1 for c in cli.sessions[0] if re.fullmatch(r"show ssl cert \S+", c)) == 100
    finally:
        cli.close()


class _FakeBatchDeployer:
    """A Deployer stand-in for batch_deploy: refuses `refused` names up front,
    fails `failing` ones in the batch; records every batch."""

    def __init__(self, refused: set[str], failing: set[str]) -> None:
        self.refused, self.failing = refused, failing
        self.batches: list[list[str]] = []

    def _check_target(self, target: DeployTarget) -> tuple[Path, bytes]:
        if target.name in self.refused:
            raise deploy_mod.BundleError(f"certificate {target.name!r}: refused")
        return Path(target.name), b""

    def deploy_batch(self, targets: list[DeployTarget]) -> list[deploy_mod.DeployResult]:
        self.batches.append([t.name for t in targets])
        out = []
        for t in targets:
            r = deploy_mod.DeployResult(t.name, Path(t.name), t.serial)
            r.ok = t.name not in self.failing
            if not r.ok:
                r.errors.append("verification failed")
            out.append(r)
        return out


def test_batch_deploy_gives_each_certificate_its_own_outcome() -> None:
    fake = _FakeBatchDeployer(refused={"bad"}, failing={"late"})

    def target_of(name: str) -> DeployTarget | None:
        return None if name == "gone" else DeployTarget(name, b"", 1, [f"{name}.example.test"])

    out = deploy_mod.batch_deploy(fake, ["a", "bad", "late", "gone", "b"], target_of)  # type: ignore[arg-type]
    assert fake.batches == [["a", "late", "b"]]  # the refused and the missing stay out
    assert isinstance(out["a"], deploy_mod.DeployResult) and out["a"].ok
    assert isinstance(out["late"], deploy_mod.DeployError)
    assert isinstance(out["bad"], deploy_mod.BundleError)
    assert isinstance(out["gone"], deploy_mod.BundleError)


def test_concurrent_single_deploys_are_coalesced_into_one_batch() -> None:
    seen: list[list[str]] = []
    gate = threading.Barrier(5)

    def run_batch(names: list[str]) -> dict[str, deploy_mod.DeployResult | Exception]:
        seen.append(sorted(names))
        out: dict[str, deploy_mod.DeployResult | Exception] = {}
        for n in names:
            r = deploy_mod.DeployResult(n, Path(n), 1)
            r.ok = n != "c"
            out[n] = r if r.ok else deploy_mod.DeployError(r)
        return out

    co = deploy_mod.DeployCoalescer(run_batch, window=0.5)
    outcomes: dict[str, object] = {}

    def one(name: str) -> None:
        gate.wait(5)
        try:
            outcomes[name] = co.deploy(name)
        except deploy_mod.DeployError as e:
            outcomes[name] = e

    threads = [threading.Thread(target=one, args=(n,)) for n in "abcde"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [["a", "b", "c", "d", "e"]]
    assert isinstance(outcomes["c"], deploy_mod.DeployError)
    assert all(isinstance(outcomes[n], deploy_mod.DeployResult) for n in "abde")
