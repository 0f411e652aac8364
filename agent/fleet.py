"""Fleet mode: the Redis connection of a [fleet] config, and the shared challenge registry.

`redis_client(fleet)` builds the synchronous redis-py client for `FleetConfig`
(URL with TLS and a CA bundle, a unix socket, or the primary that Sentinel
names for `service`; ACL user and the password from `password_file`).

`RedisChallengeRegistry` is the `ChallengeRegistry` every node of a fleet shares:

    NS:challenges   hash token -> {"k": key authorization, "e": expires_at (UNIX s)}
    NS:challenges   pub/sub channel: {"op": "add"|"del", "t": token[, "k", "e"]}

Guarantees and limits (this step):
- `add` returns once the Redis primary has executed HSET + PUBLISH (its EXEC
  reply): the entry is in the primary's memory (durable per its AOF policy),
  not necessarily on a replica (no WAIT), and every node subscribed at that
  moment has been sent it. If Redis cannot be reached `add` raises
  (redis.RedisError), so the CA is never told to validate a token the fleet
  does not know. The adding node's own mirror has it at once.
- `lookup` (the SPOE hot path) never does network I/O: it answers from a local
  mirror that a background thread keeps current by pub/sub, resynchronised
  (HGETALL) after every (re)subscription, so messages missed while cut off
  are not lost. A token another node added is answered once its message
  arrived (normally well under a millisecond on a LAN).
- GAP (left for a later step): a token missing from the mirror is answered
  "unknown" for the frame that asked; it is queued (bounded queue, shape
  check first, short negative cache) for the background thread to fetch
  with HGET, so the CA's retry or its next vantage point is answered. The
  async lookup with a late ACK will answer the frame itself.
- Redis unreachable: lookups keep answering from the mirror (entries expire
  by their own `expires_at`), the thread reconnects with a bounded backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.sentinel

from agent.challenges import ChallengeRegistry, valid_token
from agent.config import FleetConfig

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # s to connect to Redis
SOCKET_TIMEOUT = 5.0  # s for one command's reply


def _password(fleet: FleetConfig) -> str | None:
    if fleet.password_file is None:
        return None
    return fleet.password_file.read_text().splitlines()[0].strip()


_REACHED: set[tuple[str, int]] = set()  # plain Redis servers this process has talked to


class PlainConnection(redis.Connection):
    """A plain-TCP connection whose failure at the very first command says what it
    most likely means: the port speaks TLS (redis-py only says "Connection reset by
    peer"). Only for a server this process never reached: a known server dropping
    connections is restarting, not misconfigured. Used for redis:// URLs."""

    def on_connect_check_health(self, check_health: bool = True) -> None:
        where = (str(self.host), int(self.port))
        try:
            super().on_connect_check_health(check_health=check_health)
        except redis.ConnectionError as e:
            if type(e) is not redis.ConnectionError or where in _REACHED:
                raise  # AuthenticationError and the like: the server did speak Redis
            raise redis.ConnectionError(
                f"{e}: Redis at {self.host}:{self.port} dropped the connection at the first "
                "command; if that port is a TLS port (tls-port), use a rediss:// URL "
                "(with ca_file)"
            ) from e
        _REACHED.add(where)


def redis_client(fleet: FleetConfig, **kwargs: Any) -> redis.Redis:
    """The synchronous client for `fleet` (bytes replies). `kwargs` go to redis-py."""
    opts: dict[str, Any] = {
        "username": fleet.username,
        "password": _password(fleet),
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 30,
        **kwargs,
    }
    if fleet.redis is not None:
        if fleet.redis.startswith("rediss://") and fleet.ca_file is not None:
            opts["ssl_ca_certs"] = str(fleet.ca_file)
        if fleet.redis.startswith("redis://"):
            opts.setdefault("connection_class", PlainConnection)
        return redis.Redis.from_url(fleet.redis, **opts)
    assert fleet.service is not None
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(fleet.sentinels),
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
    )
    primary: redis.Redis = sentinel.master_for(fleet.service, **opts)  # type: ignore[no-untyped-call]
    return primary


class RedisChallengeRegistry(ChallengeRegistry):
    """Challenges shared through Redis under `namespace`, answered from a local mirror.

    `start()` starts the mirror thread (also called by the constructor unless
    `start=False`); `close()` stops it. `clock`: UNIX seconds (expiry checks).
    """

    MISS_QUEUE = 64  # tokens waiting to be fetched; more are dropped
    NEGATIVE_TTL = 2.0  # s a token found nowhere is not asked for again
    NEGATIVE_MAX = 10_000  # entries in the negative cache; when full, misses are not queued
    BACKOFF_MAX = 2.0  # s between reconnection attempts, at most

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        clock: Callable[[], float] = time.time,
        start: bool = True,
    ) -> None:
        self.client = client
        self.key = f"{namespace}:challenges"
        self.channel = self.key
        self._clock = clock
        self._mirror: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._negative: dict[str, float] = {}  # token -> time.monotonic() until which it is unknown
        self._misses: queue.Queue[str] = queue.Queue(self.MISS_QUEUE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()  # set while subscribed and resynchronised
        self.fetches = 0  # HGETs made for missed tokens (to check the flood bound)
        if start:
            self.start()

    # --- ChallengeRegistry ---

    def add(self, token: str, key_authorization: str, expires_at: float) -> None:
        if not valid_token(token):
            raise ValueError(f"not a valid ACME token: {token[:40]!r}")
        if not key_authorization.startswith(token + "."):
            raise ValueError("key authorization does not belong to the token")
        entry = json.dumps({"k": key_authorization, "e": expires_at})
        message = json.dumps({"op": "add", "t": token, "k": key_authorization, "e": expires_at})
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key, token, entry)
        pipe.publish(self.channel, message)
        pipe.execute()  # raises redis.RedisError when the primary did not take it
        with self._lock:
            self._mirror[token] = (key_authorization, expires_at)
            self._negative.pop(token, None)

    def remove(self, token: str) -> None:
        with self._lock:
            self._mirror.pop(token, None)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(self.key, token)
            pipe.publish(self.channel, json.dumps({"op": "del", "t": token}))
            pipe.execute()
        except redis.RedisError as e:
            # The entry expires by itself; cleanup must not fail the order.
            log.warning("challenge %s: cannot remove it from Redis: %s", token[:12], e)

    def lookup(self, token: str) -> str | None:
        if not valid_token(token):
            return None
        entry = self._mirror.get(token)  # atomic under the GIL: no lock on the hot path
        if entry is None:
            self._missed(token)
            return None
        key_authorization, expires_at = entry
        if expires_at <= self._clock():
            with self._lock:
                self._mirror.pop(token, None)
            return None
        return key_authorization

    def __len__(self) -> int:
        now = self._clock()
        with self._lock:
            return sum(1 for _, exp in self._mirror.values() if exp > now)

    # --- misses ---

    def _missed(self, token: str) -> None:
        now = time.monotonic()
        until = self._negative.get(token)
        if until is not None and until > now:
            return
        with self._lock:
            if len(self._negative) >= self.NEGATIVE_MAX:
                self._negative = {t: u for t, u in self._negative.items() if u > now}
                if len(self._negative) >= self.NEGATIVE_MAX:
                    return  # a flood: answer from the mirror only until it expires
            self._negative[token] = now + self.NEGATIVE_TTL
        with contextlib.suppress(queue.Full):
            self._misses.put_nowait(token)

    def _fetch_misses(self) -> None:
        for _ in range(self.MISS_QUEUE):
            try:
                token = self._misses.get_nowait()
            except queue.Empty:
                return
            self.fetches += 1
            raw = self.client.hget(self.key, token)
            if raw is not None:
                self._apply_entry(token, raw)

    # --- mirror thread ---

    def _apply_entry(self, token: str, raw: bytes | str) -> None:
        try:
            data = json.loads(raw)
            entry = (str(data["k"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            log.warning("challenge %s: damaged entry in Redis ignored", token[:12])
            return
        if not valid_token(token) or not entry[0].startswith(token + "."):
            return
        with self._lock:
            self._mirror[token] = entry
            self._negative.pop(token, None)

    def _apply_message(self, data: bytes | str) -> None:
        try:
            msg = json.loads(data)
            op, token = msg["op"], str(msg["t"])
        except (ValueError, KeyError, TypeError):
            return
        if op == "add":
            self._apply_entry(token, json.dumps({"k": msg.get("k"), "e": msg.get("e")}))
        elif op == "del":
            with self._lock:
                self._mirror.pop(token, None)

    def _resync(self) -> None:
        """Replace the mirror by the hash (called once subscribed: nothing is missed)."""
        raw = self.client.hgetall(self.key)
        now = self._clock()
        fresh: dict[str, tuple[str, float]] = {}
        expired: list[str] = []
        for t, v in raw.items():
            token = t.decode() if isinstance(t, bytes) else str(t)
            try:
                data = json.loads(v)
                entry = (str(data["k"]), float(data["e"]))
            except (ValueError, KeyError, TypeError):
                continue
            if entry[1] <= now:
                expired.append(token)
            elif valid_token(token) and entry[0].startswith(token + "."):
                fresh[token] = entry
        with self._lock:
            self._mirror = fresh
        if expired:
            self.client.hdel(self.key, *expired)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fleet-challenges", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self._resync()
                self.connected.set()
                backoff = 0.05
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self._apply_message(message["data"])
                    self._fetch_misses()
            except (redis.RedisError, OSError) as e:
                if self.connected.is_set():
                    log.warning(
                        "fleet challenges: Redis unreachable, answering from the mirror: %s", e
                    )
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
        self.connected.clear()


# --- node heartbeats ---------------------------------------------------------------
#
#     NS:node:NODE  {"node", "host", "pid", "started", "seen" (UNIX s), "serials": {cert: serial}}
#                   with a PX expiry of `ttl`: the key exists while the node is alive
#     NS:nodes      set of every node that ever beat (so a dead one is still listed)

HEARTBEAT_INTERVAL = 5.0  # s between beats
HEARTBEAT_TTL = 15.0  # s a beat stays valid: three missed beats and the node is dead


def beat(
    client: redis.Redis,
    namespace: str,
    node: str,
    serials: dict[str, str | None] | None = None,
    *,
    ttl: float = HEARTBEAT_TTL,
    started: float | None = None,
) -> None:
    """Record that `node` is alive now (for `ttl` seconds), with `serials`: the serial
    of each certificate as this node's daemon knows it (stored and deployed by it;
    what its HAProxy serves, checked by handshake, is a later step)."""
    import os
    import socket

    record = {
        "node": node,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "seen": time.time(),
        "serials": serials or {},
    }
    pipe = client.pipeline(transaction=True)
    pipe.set(f"{namespace}:node:{node}", json.dumps(record), px=max(1, int(ttl * 1000)))
    pipe.sadd(f"{namespace}:nodes", node)
    pipe.execute()


def list_nodes(client: redis.Redis, namespace: str) -> list[dict[str, Any]]:
    """Every node that ever beat, sorted by name: {"node", "alive", "seen", "serials", ...}.

    `alive` is True while its last beat's TTL runs; a dead node keeps only its name
    (its record expired with the TTL), `seen` None."""
    names = sorted(
        n.decode() if isinstance(n, bytes) else str(n)
        for n in client.smembers(f"{namespace}:nodes")  # type: ignore[union-attr]
    )
    if not names:
        return []
    raws = client.mget([f"{namespace}:node:{n}" for n in names])
    out: list[dict[str, Any]] = []
    for name, raw in zip(names, raws, strict=True):  # type: ignore[arg-type]
        if raw is None:
            out.append({"node": name, "alive": False, "seen": None, "serials": {}})
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            data = {}
        out.append({**data, "node": name, "alive": True})
    return out


class Heartbeat:
    """A thread that calls `beat` every `interval` seconds until `stop()`.

    `serials()` returns {certificate: serial} as `beat` records it (read on
    every beat); a failed beat is logged and retried at the next interval, so
    a Redis outage only makes the node look dead to the others."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        node: str,
        serials: Callable[[], dict[str, str | None]] = dict,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        ttl: float = HEARTBEAT_TTL,
    ) -> None:
        self.client, self.namespace, self.node = client, namespace, node
        self.serials, self.interval, self.ttl = serials, interval, ttl
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                beat(
                    self.client, self.namespace, self.node, self.serials(),
                    ttl=self.ttl, started=self.started,
                )  # fmt: skip
            except (redis.RedisError, OSError) as e:
                log.warning("fleet heartbeat of node %s failed: %s", self.node, e)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop beating and drop our record (the others see us gone at once)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with contextlib.suppress(redis.RedisError, OSError):
            self.client.delete(f"{self.namespace}:node:{self.node}")


# --- fan-out: "certificate changed" ------------------------------------------------
#
#     NS:certificates  pub/sub channel: {"name", "serial", "fence", "node"}
#
# A message is a hint, not the truth: a node that was cut off catches up by
# comparing serials (later step), never by trusting it saw every message.


def publish_changed(
    client: redis.Redis, namespace: str, name: str, serial: str, fence: int | None, node: str
) -> int:
    """Tell every node that certificate `name` now has `serial`; returns how many
    subscribers Redis delivered it to."""
    message = json.dumps({"name": name, "serial": serial, "fence": fence, "node": node})
    return int(client.publish(f"{namespace}:certificates", message))


class ChangeListener:
    """A thread calling `on_change(name, serial, fence, node)` for every "certificate
    changed" message, resubscribing (bounded backoff) after Redis errors.
    `connected` is set while subscribed. The callback runs on this thread."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        on_change: Callable[[str, str, int | None, str], object],
    ) -> None:
        self.client, self.channel, self.on_change = client, f"{namespace}:certificates", on_change
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-changes", daemon=True)

    def start(self) -> ChangeListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self.connected.set()
                backoff = 0.05
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        m = json.loads(message["data"])
                        name, serial, node = str(m["name"]), str(m["serial"]), str(m["node"])
                        fence = None if m.get("fence") is None else int(m["fence"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("fleet: ignored a malformed certificate message")
                        continue
                    try:
                        self.on_change(name, serial, fence, node)
                    except Exception:
                        log.exception("fleet: handling the change of %s failed", name)
            except (redis.RedisError, OSError) as e:
                if self.connected.is_set():
                    log.warning("fleet: certificate messages interrupted: %s", e)
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RedisChallengeRegistry.BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
        self.connected.clear()
