"""Start-up checks of who can read the private keys.

The agent never loosens a mode itself: it reports. `check(config)` looks at
every stable key file, every HAProxy bundle `<cert_dir>/<name>.pem` (it holds
the key too), the state directory (account key) and the cert directory:

- readable or writable by others ("world"): always a problem; a warning, or
  fatal with `strict_permissions = true`;
- readable or writable by the group: fatal with `strict_permissions = true`,
  accepted otherwise (a deliberate `0640 root:haproxy` layout);
- a directory writable by others (anyone could swap a bundle or a key): same
  rules.

`enforce(config)` logs the warnings and raises `PermissionsError` listing the
fatal problems, each naming the file, its mode and the fix (`chmod 600 FILE`).
`startup_checks(config)` is what `run`, `renew` and `check-config` all call:
the state directory must be usable as it is (a directory, closed to others),
then `enforce`; so `check-config` passes exactly the configs `run` accepts.
Missing files are not a problem here (config validation and issuance own
that).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config, ConfigError
from agent.storage import private_dir_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One finding: `fatal` ones stop the agent under strict_permissions."""

    path: Path
    message: str
    fatal: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PermissionsError(Exception):
    """Keys or directories too open while strict_permissions is on; lists every problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(
            f"refusing to start: private key material is readable or writable by others "
            f"(strict_permissions = true):\n  {lines}"
        )


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


def check_secret_file(path: Path, what: str, strict: bool) -> list[Problem]:
    """Problems of one file holding a private key (`what` says which, e.g. "key of www")."""
    mode = _mode(path)
    if mode is None:
        return []
    return secret_mode_problems(path, mode, what, strict)


def secret_mode_problems(path: Path, mode: int, what: str, strict: bool) -> list[Problem]:
    """`check_secret_file` for a file whose permission bits `mode` are known."""
    problems = []
    fix = f"fix: chmod 600 {path}"
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        kind = "world-readable" if mode & stat.S_IROTH else "world-writable"
        problems.append(Problem(path, f"{what} is {kind} (mode {mode:04o}); {fix}", strict))
    if strict and mode & (stat.S_IRGRP | stat.S_IWGRP):
        problems.append(Problem(path, f"{what} is group-accessible (mode {mode:04o}); {fix}", True))
    return problems


def check_directory(path: Path, what: str, strict: bool, private: bool) -> list[Problem]:
    """A directory: never writable by others; with `private`, not readable by them either."""
    mode = _mode(path)
    if mode is None:
        return []
    problems = []
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        problems.append(
            Problem(
                path, f"{what} is world-writable (mode {mode:04o}); fix: chmod o-w {path}", strict
            )
        )
    if private and mode & (stat.S_IROTH | stat.S_IXOTH):
        problems.append(
            Problem(
                path, f"{what} is open to others (mode {mode:04o}); fix: chmod 700 {path}", strict
            )
        )
    return problems


def check(config: Config, strict: bool | None = None) -> list[Problem]:
    """Every permission problem of `config`'s key material (strict defaults to the config's)."""
    if strict is None:
        strict = config.strict_permissions
    problems: list[Problem] = []
    problems += check_directory(config.state_dir, "state directory", strict, private=True)
    problems += check_directory(config.haproxy.cert_dir, "cert_dir", strict, private=False)
    seen: set[tuple[int, int]] = set()  # (st_dev, st_ino): a file linked twice is checked once
    dirs_seen: set[Path] = set()
    cert_dir = str(config.haproxy.cert_dir)
    for c in config.certificates:
        # The key: stat'ed by load_config moments ago (no second stat) unless
        # it is a generate_key key that did not exist then.
        facts = c.key_facts
        if facts is not None:
            key_ident: tuple[int, int] | None = (facts.identity[0], facts.identity[1])
            key_mode = facts.mode
        else:
            key_ident, key_mode = _ident_mode(c.key)
        if key_ident is not None and key_ident not in seen:
            seen.add(key_ident)
            what = f"private key of certificate {c.name!r}"
            problems += secret_mode_problems(c.key, key_mode, what, strict)
            if c.key.parent not in dirs_seen:
                dirs_seen.add(c.key.parent)
                problems += check_directory(
                    c.key.parent, f"directory of the key of {c.name!r}", strict, private=False
                )
        # Its HAProxy bundle (a str path: 10,000 of them at start).
        bundle = os.path.join(cert_dir, f"{c.name}.pem")
        ident, mode = _ident_mode(bundle)
        if ident is not None and ident not in seen:
            seen.add(ident)
            what = f"HAProxy bundle of {c.name!r} (has the key)"
            problems += secret_mode_problems(Path(bundle), mode, what, strict)
    return problems


def _ident_mode(path: str | Path) -> tuple[tuple[int, int] | None, int]:
    """((st_dev, st_ino), permission bits) of `path`; (None, 0) when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, 0
    return (st.st_dev, st.st_ino), stat.S_IMODE(st.st_mode)


def startup_checks(config: Config, logger: logging.Logger | None = None) -> list[Problem]:
    """Every check `run`, `renew` and `check-config` make before doing anything; writes nothing.

    Raises ConfigError (exit 2, naming `state_dir`) when the state directory is
    not a directory or is open to others: the agent never chmods a directory it
    did not create (agent.storage.ensure_private_dir refuses it the same way).
    Then `enforce`: warnings logged, PermissionsError for fatal problems.
    """
    problem = private_dir_problem(config.state_dir)
    if problem is not None:
        raise ConfigError(config.path, "state_dir", problem)
    return enforce(config, logger)


def enforce(config: Config, logger: logging.Logger | None = None) -> list[Problem]:
    """Log every problem; raise PermissionsError when any is fatal. Returns the warnings."""
    lg = logger or log
    problems = check(config)
    fatal = [p for p in problems if p.fatal]
    for p in problems:
        if not p.fatal:
            lg.warning("permissions: %s", p)
    if fatal:
        raise PermissionsError(fatal)
    return problems
