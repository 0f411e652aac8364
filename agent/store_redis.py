"""`Storage` on Redis, for a fleet of agents sharing one backend ([fleet] in the config).

Layout, every name under the fleet's `namespace` NS:

    NS:v:KEY      hash {d: value bytes, m: modified (UNIX s), e: "1" if encrypted}
    NS:index      sorted set of every KEY (all scores 0, so ZRANGEBYLEX lists a prefix)
    NS:lock:NAME  the lock record (LockOwner JSON + "fence"), with a PX expiry = the lease
    NS:fence:NAME counter INCRemented on every acquisition of lock NAME (fencing token)

Contract (that of `agent.storage.Storage`, checked by tests/test_storage_contract.py
against a real redis-server) plus:
- A value and its index entry change in one MULTI/EXEC, so a reader sees the
  whole old or the whole new value and `list` never names a half-written key.
- `secret=True` values are encrypted with AES-GCM under the fleet secret
  (32 bytes, `secret_file`): a random 96-bit nonce per value, the namespaced
  key name as associated data (a ciphertext moved to another key does not
  decrypt). A store without a secret refuses `secret=True` (ValueError); a
  value that does not decrypt raises `SecretError` naming the key.
- Locks: SET NX PX with a random owner token; renewal and release are
  compare-and-set / compare-and-delete scripts run atomically by Redis, so a
  holder whose lease ran out can never extend or delete its successor's lock.
  A record whose holder provably died on this host (`holder_is_gone`) is
  taken over by a compare-and-swap on the exact record read. Each acquisition
  INCRements NS:fence:NAME; `fence(name)` returns the value of our current
  hold, to be recorded with what we install so a stale holder's late write can
  be detected (a larger fence wins). `commit_fenced` is that check and the
  write in one Lua script: refused when our lock key is gone or not ours (the
  PX lease ran out) or the stored fence is larger than ours.
- Leases are the lock key's PX, counted by Redis: a node never takes a live
  lock over by comparing the record's `expires` (another node's wall clock)
  with its own, so clock skew between nodes changes nothing.
- Every call is a synchronous round trip: call it off the event loop
  (the daemon does, asyncio.to_thread).
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.storage import (
    DEFAULT_LEASE,
    FenceRejected,
    KeyInfo,
    LockLost,
    LockOwner,
    LockTimeout,
    Storage,
    StoreUnavailable,
    holder_is_gone,
    safe_key,
    safe_name,
)

log = logging.getLogger(__name__)

SECRET_LENGTH = 32  # bytes of the fleet secret (AES-256-GCM)
_NONCE = 12
_ENC_VERSION = b"\x01"

# Lock scripts: each runs atomically in Redis. Records are LockOwner JSON plus
# "fence"; cjson keeps 14 significant digits (0.1 ms for UNIX times).
# KEYS[1] lock, KEYS[2] fence counter; ARGV[1] our record (no fence), ARGV[2] lease ms.
# Returns our fence, or 0 when the lock is held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local f = redis.call('INCR', KEYS[2])
local o = cjson.decode(ARGV[1])
o['fence'] = f
redis.call('SET', KEYS[1], cjson.encode(o), 'PX', ARGV[2])
return f
"""
# As _ACQUIRE, but only if the record is still exactly ARGV[3] (a stale one we read).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return 0 end
local f = redis.call('INCR', KEYS[2])
local o = cjson.decode(ARGV[1])
o['fence'] = f
redis.call('SET', KEYS[1], cjson.encode(o), 'PX', ARGV[2])
return f
"""
# KEYS[1] lock; ARGV[1] our token, ARGV[2] new expiry (UNIX s), ARGV[3] lease ms.
_RENEW = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, o = pcall(cjson.decode, v)
if not ok or type(o) ~= 'table' or o['token'] ~= ARGV[1] then return 0 end
o['expires'] = tonumber(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(o), 'PX', ARGV[3])
return 1
"""
# KEYS[1] lock; ARGV[1] our token.
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, o = pcall(cjson.decode, v)
if not ok or type(o) ~= 'table' or o['token'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
# The fenced commit. KEYS[1] lock, KEYS[2] value key of the fence, KEYS[3] index,
# KEYS[4..] value keys; ARGV[1] our token, ARGV[2] our fence, ARGV[3] mtime,
# ARGV[4] the fence's key name, then (key name, data) per value.
# Returns {1, ""} when written, {0, "lease"} or {0, <stored fence>} when refused.
_COMMIT_FENCED = """
local v = redis.call('GET', KEYS[1])
if not v then return {0, 'lease'} end
local ok, o = pcall(cjson.decode, v)
if not ok or type(o) ~= 'table' or o['token'] ~= ARGV[1] then return {0, 'lease'} end
local cur = tonumber(redis.call('HGET', KEYS[2], 'd'))
if cur and cur > tonumber(ARGV[2]) then return {0, tostring(cur)} end
for i = 4, #KEYS do
  local j = 3 + (i - 3) * 2
  redis.call('DEL', KEYS[i])
  redis.call('HSET', KEYS[i], 'd', ARGV[j + 1], 'm', ARGV[3], 'e', '0')
  redis.call('ZADD', KEYS[3], 0, ARGV[j])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'd', ARGV[2], 'm', ARGV[3], 'e', '0')
redis.call('ZADD', KEYS[3], 0, ARGV[4])
return {1, ''}
"""


def _bytes(value: object) -> bytes:
    """A reply of the client (decode_responses off: bytes) as bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"unexpected Redis reply {type(value).__name__}")


_F = TypeVar("_F", bound=Callable[..., Any])


def _reachable(method: _F) -> _F:
    """Turn the client's connection errors into `StoreUnavailable` (an OSError),
    so callers handle "Redis is away" as they handle a store they cannot reach,
    without knowing about redis-py."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as e:
            # ReadOnlyError: a primary demoted by a Sentinel failover, until the
            # client follows the new one.
            raise StoreUnavailable(f"fleet store unavailable (Redis): {e}") from e

    return wrapper  # type: ignore[return-value]


class SecretError(ValueError):
    """A secret value in Redis does not decrypt under this node's fleet secret."""


def load_secret(path: os.PathLike[str] | str) -> bytes:
    """The fleet secret: exactly SECRET_LENGTH bytes from `path` (validated by the config)."""
    data = open(path, "rb").read()  # noqa: SIM115 - small file, closed by refcount
    if len(data) != SECRET_LENGTH:
        raise ValueError(f"{path}: the fleet secret must be {SECRET_LENGTH} bytes, not {len(data)}")
    return data


class RedisStorage(Storage):
    """`Storage` in Redis under `namespace`; `secret`: the 32-byte fleet secret (or None)."""

    LOCK_POLL = 0.05  # seconds between attempts while waiting for a lock
    shared = True  # the fleet's nodes all use it

    def __init__(self, client: redis.Redis, namespace: str, secret: bytes | None = None) -> None:
        if secret is not None and len(secret) != SECRET_LENGTH:
            raise ValueError(f"the fleet secret must be {SECRET_LENGTH} bytes")
        self.client = client
        self.ns = safe_name(namespace)
        self._aead = AESGCM(secret) if secret is not None else None
        self._held: dict[str, tuple[str, int]] = {}  # lock name -> (token, fence)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._take_over = client.register_script(_TAKE_OVER)
        self._commit = client.register_script(_COMMIT_FENCED)
        self._loaded: set[str] = set()  # SHAs of scripts `_pipelined` loaded on the server

    # --- names ---

    def _vkey(self, key: str) -> str:
        return f"{self.ns}:v:{key}"

    def _index(self) -> str:
        return f"{self.ns}:index"

    def _lkey(self, name: str) -> str:
        return f"{self.ns}:lock:{safe_name(name)}"

    def _fkey(self, name: str) -> str:
        return f"{self.ns}:fence:{safe_name(name)}"

    # --- values ---

    def _ad(self, key: str) -> bytes:
        return f"{self.ns}:{key}".encode()

    @_reachable
    def store(self, key: str, value: bytes, *, secret: bool = False) -> None:
        key = safe_key(key)
        data = bytes(value)
        if secret:
            if self._aead is None:
                raise ValueError(f"cannot store secret {key!r}: this store has no fleet secret")
            nonce = os.urandom(_NONCE)
            data = _ENC_VERSION + nonce + self._aead.encrypt(nonce, data, self._ad(key))
        pipe = self.client.pipeline(transaction=True)
        vkey = self._vkey(key)
        pipe.delete(vkey)  # drop a stale "e" flag of an earlier secret value
        pipe.hset(vkey, mapping={"d": data, "m": repr(time.time()), "e": "1" if secret else "0"})
        pipe.zadd(self._index(), {key: 0})
        pipe.execute()

    @_reachable
    def load(self, key: str) -> bytes:
        key = safe_key(key)
        data, enc = self.client.hmget(self._vkey(key), ["d", "e"])
        if data is None:
            raise FileNotFoundError(f"no key {key!r} in Redis namespace {self.ns!r}")
        return self._decode(key, data, enc)

    LOAD_MANY_CHUNK = 2000  # keys per pipelined round trip (bounds one reply's size)

    @_reachable
    def load_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """`load` of every key that exists, in ONE pipelined round trip of HMGETs
        (one per LOAD_MANY_CHUNK keys), with the same checks and decryption as
        `load`: a missing key is left out, a bad name raises ValueError before
        anything is sent, a value that does not decrypt raises SecretError.
        Not one snapshot across keys: generations are immutable, and readers
        read a pointer before what it points to, as with per-key `load`."""
        wanted = list(dict.fromkeys(keys))
        names = [safe_key(k) for k in wanted]
        out: dict[str, bytes] = {}
        for i in range(0, len(names), self.LOAD_MANY_CHUNK):
            chunk = names[i : i + self.LOAD_MANY_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for key in chunk:
                pipe.hmget(self._vkey(key), ["d", "e"])
            replies = pipe.execute()
            for j, (key, (data, enc)) in enumerate(zip(chunk, replies, strict=True)):
                if data is not None:
                    out[wanted[i + j]] = self._decode(key, data, enc)
        return out

    def _decode(self, key: str, data: object, enc: object) -> bytes:
        """The value of `key` from its stored fields d (`data`) and e (`enc`)."""
        data = _bytes(data)
        if enc != b"1":
            return data
        if self._aead is None:
            raise SecretError(f"{key!r} is encrypted and this store has no fleet secret")
        if data[:1] != _ENC_VERSION or len(data) < 1 + _NONCE + 16:
            raise SecretError(f"{key!r}: not an encrypted value of a known version")
        nonce, ct = data[1 : 1 + _NONCE], data[1 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, ct, self._ad(key))
        except InvalidTag:
            raise SecretError(
                f"{key!r} does not decrypt: this node's secret_file differs from the one "
                "that stored it (every node of a fleet needs the same secret_file)"
            ) from None

    @_reachable
    def delete(self, key: str) -> None:
        key = safe_key(key)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._vkey(key))
        pipe.zrem(self._index(), key)
        pipe.execute()

    @_reachable
    def exists(self, key: str) -> bool:
        return bool(self.client.exists(self._vkey(safe_key(key))))

    @_reachable
    def _below(self, prefix: str) -> builtins.list[str]:
        if not prefix:
            raw = self.client.zrange(self._index(), 0, -1)
        else:
            head = safe_key(prefix) + "/"
            # "0" follows "/" in ASCII: [head, head with "/" -> "0") is every key below.
            raw = self.client.zrangebylex(self._index(), f"[{head}", f"({head[:-1]}0")
        return [_bytes(r).decode() for r in raw]  # type: ignore[union-attr]

    def list(self, prefix: str, recursive: bool = False) -> builtins.list[str]:
        keys = self._below(prefix)
        if recursive:
            return sorted(keys)
        head = safe_key(prefix) + "/" if prefix else ""
        children = {head + k[len(head) :].split("/", 1)[0] for k in keys}
        return sorted(children)

    @_reachable
    def stat(self, key: str) -> KeyInfo:
        key = safe_key(key)
        size, modified = (
            self.client.hstrlen(self._vkey(key), "d"),
            self.client.hget(self._vkey(key), "m"),
        )
        if modified is None:
            raise FileNotFoundError(f"no key {key!r} in Redis namespace {self.ns!r}")
        return KeyInfo(key=key, size=int(size), modified=float(modified))

    @_reachable
    def delete_all(self, prefix: str) -> None:
        keys = self._below(prefix)
        for i in range(0, len(keys), 500):
            batch = keys[i : i + 500]
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(*[self._vkey(k) for k in batch])
            pipe.zrem(self._index(), *batch)
            pipe.execute()

    # --- locks ---

    @staticmethod
    def _lease_ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    @_reachable
    def lock_owner(self, name: str) -> LockOwner | None:
        raw = self.client.get(self._lkey(name))
        if raw is None:
            return None
        return self._parse_owner(_bytes(raw))

    @staticmethod
    def _parse_owner(raw: bytes) -> LockOwner:
        try:
            return LockOwner.from_json(json.loads(raw), DEFAULT_LEASE)
        except (ValueError, KeyError, TypeError):
            # A damaged record counts as expired (its PX, if any, ends it anyway).
            return LockOwner("", "", 0, None, None, 0.0, 0.0)

    def lock(self, name: str, timeout: float = 60.0, expires_after: float = DEFAULT_LEASE) -> str:
        lkey, fkey = self._lkey(name), self._fkey(name)
        deadline = time.monotonic() + timeout
        ms = self._lease_ms(expires_after)
        while True:
            now = time.time()
            mine = LockOwner.for_this_process(expires_after, now)
            record = json.dumps(mine.to_json())
            try:
                fence = int(self._acquire(keys=[lkey, fkey], args=[record, ms]))
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as e:
                raise StoreUnavailable(f"fleet store unavailable (Redis): {e}") from e
            owner = None
            if not fence:
                raw = self.client.get(lkey)
                owner = None if raw is None else self._parse_owner(_bytes(raw))
                # The lease is the key's PX, counted by Redis: a record with a TTL
                # is only taken over when its holder provably died on this host,
                # never by comparing its `expires` (another node's clock) with ours.
                # A record without TTL (damaged, planted by hand) has only `expires`.
                judged_at = now if raw is not None and self.client.pttl(lkey) == -1 else 0.0
                if raw is not None and owner is not None and holder_is_gone(owner, judged_at):
                    fence = int(self._take_over(keys=[lkey, fkey], args=[record, ms, raw]))
                    if fence:
                        why = "its lease ran out" if owner.expires <= now else "it is gone"
                        log.warning(
                            "lock %r: taking over from %s pid %d (%s)",
                            name, owner.host, owner.pid, why,
                        )  # fmt: skip
            if fence:
                self._held[name] = (mine.token, fence)
                return mine.token
            if time.monotonic() >= deadline:
                who = f"{owner.host} pid {owner.pid}" if owner is not None else "unknown"
                raise LockTimeout(
                    f"lock {name!r} is held by another process ({who}, Redis key {lkey})"
                )
            time.sleep(self.LOCK_POLL)

    @_reachable
    def try_lock_many(
        self, names: Iterable[str], expires_after: float = DEFAULT_LEASE
    ) -> dict[str, str]:
        """The _ACQUIRE script of every lock, pipelined (one round trip; a SCRIPT
        LOAD first, once per store); a held lock is left out, never taken over
        here (`lock` does that, after judging the holder)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        now = time.time()
        ms = self._lease_ms(expires_after)
        mine = {n: LockOwner.for_this_process(expires_after, now) for n in wanted}
        calls = [
            ([self._lkey(n), self._fkey(n)], [json.dumps(mine[n].to_json()), ms]) for n in wanted
        ]
        out: dict[str, str] = {}
        for n, fence in zip(wanted, self._pipelined(self._acquire, calls), strict=True):
            if int(fence):
                self._held[n] = (mine[n].token, int(fence))
                out[n] = mine[n].token
        return out

    @_reachable
    def unlock_many(self, held: Mapping[str, str]) -> builtins.list[str]:
        """The _RELEASE script of every lock, pipelined (one round trip; a SCRIPT
        LOAD first, once per store)."""
        if not held:
            return []
        for name, token in held.items():
            if name in self._held and self._held[name][0] == token:
                del self._held[name]
        calls = [([self._lkey(name)], [token]) for name, token in held.items()]
        replies = self._pipelined(self._release, calls)
        return [n for n, done in zip(held, replies, strict=True) if not int(done)]

    def _pipelined(
        self, script: Any, calls: builtins.list[tuple[builtins.list[str], builtins.list[Any]]]
    ) -> builtins.list[Any]:
        """EVALSHA of `script` (a registered Script) for every (keys, args), in ONE
        pipeline. Not redis-py's Script-in-pipeline, which asks SCRIPT EXISTS first:
        the documented fleet ACL allows only `script|load` (docs/fleet.md). The
        script is loaded once per store; a NOSCRIPT (Redis restarted, its script
        cache empty) fails every call of the pipeline alike, so it is loaded again
        and the pipeline sent once more."""
        for _ in range(2):
            if script.sha not in self._loaded:
                self.client.script_load(script.script)
                self._loaded.add(script.sha)
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                self._loaded.discard(script.sha)
        raise StoreUnavailable(f"Redis namespace {self.ns!r}: the lock scripts do not stay loaded")

    @_reachable
    def store_many(self, values: Mapping[str, bytes]) -> None:
        """Every value as `store` writes it, in ONE MULTI/EXEC (one round trip)."""
        if not values:
            return
        pipe = self.client.pipeline(transaction=True)
        now = repr(time.time())
        for key, value in values.items():
            vkey = self._vkey(safe_key(key))
            pipe.delete(vkey)
            pipe.hset(vkey, mapping={"d": bytes(value), "m": now, "e": "0"})
            pipe.zadd(self._index(), {safe_key(key): 0})
        pipe.execute()

    def fence(self, name: str) -> int:
        """The fencing token of our current hold of lock `name`; RuntimeError if none."""
        held = self._held.get(name)
        if held is None:
            raise RuntimeError(f"lock {name!r} is not held by this process")
        return held[1]

    def commit_fenced(
        self, lock: str, token: str, fence: int, fence_key: str, values: Mapping[str, bytes]
    ) -> None:
        fence_key = safe_key(fence_key)
        names = [safe_key(k) for k in values]
        keys = [self._lkey(lock), self._vkey(fence_key), self._index()]
        keys += [self._vkey(k) for k in names]
        args: list[str | int | bytes] = [token, fence, repr(time.time()), fence_key]
        for k, value in zip(names, values.values(), strict=True):
            args += [k, bytes(value)]
        try:
            done, why = self._commit(keys=keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as e:
            raise StoreUnavailable(f"Redis namespace {self.ns!r}: {e}") from e
        if int(done):
            return
        why = _bytes(why).decode()
        if why == "lease":
            raise FenceRejected(f"the lease of lock {lock!r} was lost (Redis key {keys[0]})")
        raise FenceRejected(f"{fence_key} carries fencing number {why}, newer than ours ({fence})")

    def check_available(self) -> None:
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as e:
            raise StoreUnavailable(f"fleet store unavailable (Redis): {e}") from e

    @_reachable
    def renew_lock(self, name: str, token: str, lease: float = DEFAULT_LEASE) -> None:
        args: list[str | int] = [token, repr(time.time() + lease), self._lease_ms(lease)]
        if not self._renew(keys=[self._lkey(name)], args=args):
            raise LockLost(f"lock {name!r} is no longer held by this process")

    @_reachable
    def unlock(self, name: str, token: str | None = None) -> None:
        if token is None:
            held = self._held.get(name)
            if held is None:
                raise RuntimeError(f"lock {name!r} is not held by this process")
            token = held[0]
        if name in self._held and self._held[name][0] == token:
            del self._held[name]
        if not self._release(keys=[self._lkey(name)], args=[token]):
            raise LockLost(
                f"lock {name!r} was taken over by another process; left it to its new holder"
            )
