"""The local demo: Pebble + HAProxy + the agent daemon on 127.0.0.1, start to finish.

1. starts Pebble (a real ACME CA doing real http-01 validation) and HAProxy
   running the configs we ship in haproxy/ (SPOE filter, runtime API);
2. writes an agent config for three demo names, each with its own stable key
   (created once: EC P-256, RSA 2048, EC P-384) and prints their pins;
3. runs `haproxy-acme-agent run`, which orders the certificates, answers the
   CA's challenges through HAProxy's SPOE and pushes the certificates into the
   running HAProxy through its runtime API, with no reload;
4. connects to HAProxy over TLS for each name and shows what it serves (and
   that the served key is the stable key), then `status` and the metrics;
5. stops everything it started, by handle.

    .venv/bin/python scripts/demo.py [--keep DIR] [--haproxy PATH]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402

from agent import keys  # noqa: E402
from tests.support.acme_stack import AcmeStack, toml_value  # noqa: E402
from tests.support.haproxy import free_port  # noqa: E402
from tests.support.tls import served_leaf  # noqa: E402

DEMO = {
    "www": ("www.demo.test", "ec256"),
    "api": ("api.demo.test", "rsa2048"),
    "shop": ("shop.demo.test", "ec384"),
}
AGENT = [sys.executable, "-m", "agent.cli"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def served(port: int, sni: str) -> x509.Certificate | None:
    try:
        return served_leaf(port, sni)
    except OSError:
        return None


def is_demo_cert(cert: x509.Certificate | None, name: str) -> bool:
    if cert is None:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return name in san.get_values_for_type(x509.DNSName)


def write_config(stack: AcmeStack, work: Path, metrics_port: int) -> Path:
    assert stack.haproxy.admin_socket is not None
    lines = [
        f"state_dir = {toml_value(work / 'state')}",
        "[acme]",
        f"directory = {toml_value(stack.pebble.directory_url)}",
        f"ca_bundle = {toml_value(stack.pebble.ca_bundle)}",
        f"trusted_roots = {toml_value(stack.pebble.roots_file())}",
        'email = "ops@demo.test"',
        "poll_interval = 0.1",
        "[spoa]",
        f'listen = "127.0.0.1:{stack.spoa_port}"',
        "[haproxy]",
        f"runtime_api = [{toml_value('unix:' + str(stack.haproxy.admin_socket))}]",
        f"cert_dir = {toml_value(work / 'haproxy-certs')}",
        f"crt_list = {toml_value(stack.workdir / 'haproxy' / 'certs.list')}",
        f'verify = ["127.0.0.1:{stack.https_port}"]',
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
    ]
    for name, (domain, key_type) in DEMO.items():
        lines += [
            "[[certificates]]",
            f'name = "{name}"',
            f'domains = ["{domain}"]',
            f"key = {toml_value(work / 'keys' / (name + '.key'))}",
            "generate_key = true",
            f'key_type = "{key_type}"',
        ]
    (work / "keys").mkdir(mode=0o700, exist_ok=True)
    path = work / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(work: Path, haproxy: str) -> int:
    say(f"starting Pebble and HAProxy ({haproxy}) on 127.0.0.1")
    # Pebble issues 90-day certificates here, like Let's Encrypt.
    with AcmeStack(work / "stack", haproxy, validity_period=90 * 86400) as stack:
        print(f"Pebble ACME directory  {stack.pebble.directory_url}")
        print(f"HAProxy http (ACME)    127.0.0.1:{stack.http_port}")
        print(f"HAProxy https          127.0.0.1:{stack.https_port}  (pid {stack.haproxy.pid})")
        metrics_port = free_port()
        config = write_config(stack, work, metrics_port)
        print(f"agent config           {config}")

        say("starting the agent daemon: haproxy-acme-agent run")
        log_path = work / "agent.log"
        with log_path.open("wb") as log:
            agent = subprocess.Popen(
                [*AGENT, "run", "-c", str(config)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 90
            pending = dict(DEMO)
            while pending and time.monotonic() < deadline:
                if agent.poll() is not None:
                    print(log_path.read_text(), file=sys.stderr)
                    raise SystemExit(f"the agent exited with {agent.returncode}")
                for name, (domain, _) in list(pending.items()):
                    if is_demo_cert(served(stack.https_port, domain), domain):
                        print(f"{domain}: served by HAProxy")
                        del pending[name]
                time.sleep(0.3)
            if pending:
                print(log_path.read_text(), file=sys.stderr)
                raise SystemExit(f"not served within 90 s: {', '.join(pending)}")

            say("what HAProxy serves now (real TLS handshakes, SNI per name)")
            for name, (domain, _) in DEMO.items():
                cert = served(stack.https_port, domain)
                assert cert is not None
                stable = keys.spki_pin(keys.load_private_key(work / "keys" / f"{name}.key"))
                leaf_pin = keys.spki_pin(cert.public_key())  # type: ignore[arg-type]
                print(f"{domain}")
                print(f"  issuer      {cert.issuer.rfc4514_string()}")
                print(f"  serial      {cert.serial_number:x}")
                print(f"  not after   {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
                same = "yes" if leaf_pin == stable else "NO"
                print(f"  key pin     {leaf_pin}  (the stable key: {same})")
            print(f"HAProxy pid {stack.haproxy.pid}: not reloaded, certificates pushed at runtime")

            say("haproxy-acme-agent status")
            subprocess.run([*AGENT, "status", "-c", str(config)], cwd=REPO, check=True)

            say("haproxy-acme-agent pins www")
            subprocess.run([*AGENT, "pins", "-c", str(config), "www"], cwd=REPO, check=True)

            say(f"metrics (http://127.0.0.1:{metrics_port}/metrics, excerpt)")
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(
                        (
                            "haproxy_acme_certificate_expiration",
                            "haproxy_acme_renewals_total",
                            "haproxy_acme_haproxy_in_sync",
                            "haproxy_acme_challenges_total",
                        )
                    ):
                        print(line)
        finally:
            say("stopping the agent, HAProxy and Pebble")
            agent.send_signal(signal.SIGTERM)
            try:
                code = agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                code = agent.wait()
            print(f"agent exited with {code}")
    print("done")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="local demo against Pebble and HAProxy")
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it afterwards")
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy", help="HAProxy binary")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run_demo(args.keep.resolve(), args.haproxy)
    work = Path(tempfile.mkdtemp(prefix="haproxy-acme-demo-"))
    try:
        return run_demo(work, args.haproxy)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
