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
- A token missing from the mirror: `fetch(token)` (the SPOE agent calls it
  after `lookup` missed) starts one HGET on a small pool of worker threads and
  returns a `concurrent.futures.Future` of the key authorization (None: not
  in Redis either), or None when it does not ask Redis at all: a token not of
  the RFC 8555 shape (base64url, 22..255 characters), a token in the short
  negative cache (NEGATIVE_TTL s after Redis said "no"), more than
  MAX_INFLIGHT distinct tokens already being fetched, the fetch budget spent
  (FETCH_RATE per second, FETCH_BURST at once: a flood of distinct unknown
  tokens costs at most that many HGETs), or Redis not connected. The same
  token asked while its fetch runs joins that fetch. The lookup connection
  has a socket timeout of LOOKUP_TIMEOUT s, so a hung Redis frees the worker
  soon; the SPOE agent gives up waiting even sooner (its lookup deadline).
- Redis unreachable: lookups keep answering from the mirror (entries expire
  by their own `expires_at`), the thread reconnects with a bounded backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis
import redis.sentinel

from agent.challenges import MAX_TOKEN_LENGTH, ChallengeRegistry, valid_token
from agent.config import FleetConfig

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 22  # RFC 8555 8.3: at least 128 bits of entropy, base64url
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

    `start()` starts the mirror thread "fleet-challenges" (also called by the
    constructor unless `start=False`); `close()` (or leaving a `with` block) stops
    and joins it: whoever builds one closes it on every path. `clock`: UNIX
    seconds (expiry checks).
    """

    NEGATIVE_TTL = 2.0  # s a token found nowhere is not asked for again
    NEGATIVE_MAX = 10_000  # entries in the negative cache; when full, misses are not fetched
    BACKOFF_MAX = 2.0  # s between reconnection attempts, at most
    MAX_INFLIGHT = 32  # distinct tokens being fetched at once; more are answered "unknown"
    FETCH_WORKERS = 4  # threads doing the HGETs
    FETCH_RATE = 50.0  # fetches per second on average (a CA asks a few times per token)
    FETCH_BURST = 50  # fetches at once after a quiet spell
    LOOKUP_TIMEOUT = 0.5  # s: socket timeout of the lookup connection
    TOMBSTONE_TTL = 5.0  # s a locally removed token ignores late "add" messages
    CLOSE_JOIN = 10.0  # s close() waits for the mirror thread to end

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
        self._inflight: dict[str, Future[str | None]] = {}
        self._removed: dict[str, float] = {}  # token -> monotonic time its tombstone ends
        self._budget = float(self.FETCH_BURST)
        self._budget_at = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None
        self._lookup_client: redis.Redis | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()  # set while subscribed and resynchronised
        self.fetches = 0  # HGETs made for missed tokens (to check the flood bound)
        self._listeners: list[Callable[[str, str, str | None, float | None], None]] = []
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
            self._removed.pop(token, None)

    def remove(self, token: str) -> None:
        with self._lock:
            self._mirror.pop(token, None)
            # Our own "add" message may still be on its way to the mirror thread:
            # it must not bring the token back after this remove returned.
            now = time.monotonic()
            if len(self._removed) >= 10_000:
                self._removed = {t: u for t, u in self._removed.items() if u > now}
            self._removed[token] = now + self.TOMBSTONE_TTL
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
            return None  # the SPOE agent may ask `fetch` (a late ACK)
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

    def add_listener(self, listener: Callable[[str, str, str | None, float | None], None]) -> None:
        """Call `listener(op, token, key_authorization, expires_at)` from the mirror
        thread for every token the mirror learns ("add") or drops ("del", None, None)
        through pub/sub or a resynchronisation, this node's own adds included. It
        must return quickly (queue the work): it runs on the thread that keeps the
        mirror current. Exceptions are logged."""
        self._listeners.append(listener)

    def remove_listener(
        self, listener: Callable[[str, str, str | None, float | None], None]
    ) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self, op: str, token: str, key_authorization: str | None,
                expires_at: float | None) -> None:  # fmt: skip
        for listener in self._listeners:
            try:
                listener(op, token, key_authorization, expires_at)
            except Exception:
                log.exception("fleet challenges: listener failed for %s", token[:12])

    # --- misses ---

    def fetch(self, token: str) -> Future[str | None] | None:
        """Look `token` up in Redis (see the module doc for when it does not):
        a Future of its key authorization (None: unknown there too), or None.
        Never blocks: the HGET runs on a worker thread."""
        if not (MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH) or not valid_token(token):
            return None
        if not self.connected.is_set() or self._stop.is_set():
            return None  # Redis unreachable: the mirror is all there is
        now = time.monotonic()
        until = self._negative.get(token)
        if until is not None and until > now:
            return None
        with self._lock:
            running = self._inflight.get(token)
            if running is not None:
                return running
            if len(self._inflight) >= self.MAX_INFLIGHT:
                return None
            self._budget = min(
                float(self.FETCH_BURST), self._budget + (now - self._budget_at) * self.FETCH_RATE
            )
            self._budget_at = now
            if self._budget < 1.0:
                return None
            if len(self._negative) >= self.NEGATIVE_MAX:
                self._negative = {t: u for t, u in self._negative.items() if u > now}
                if len(self._negative) >= self.NEGATIVE_MAX:
                    return None  # a flood: answer from the mirror only until it expires
            self._budget -= 1.0
            future: Future[str | None] = Future()
            self._inflight[token] = future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.FETCH_WORKERS, thread_name_prefix="fleet-fetch"
                )
            pool = self._pool
        try:
            pool.submit(self._fetch_one, token, future)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._inflight.pop(token, None)
            future.set_result(None)
        return future

    def _lookup_conn(self) -> redis.Redis:
        """A client of its own with a short socket timeout (a hung Redis frees the
        worker in LOOKUP_TIMEOUT s); same server, credentials and TLS as `client`."""
        if self._lookup_client is None:
            kwargs = dict(self.client.connection_pool.connection_kwargs)
            kwargs["socket_timeout"] = self.LOOKUP_TIMEOUT
            kwargs["socket_connect_timeout"] = self.LOOKUP_TIMEOUT
            pool = self.client.connection_pool.__class__(
                connection_class=self.client.connection_pool.connection_class, **kwargs
            )
            self._lookup_client = redis.Redis(connection_pool=pool)
        return self._lookup_client

    def _fetch_one(self, token: str, future: Future[str | None]) -> None:
        answer: str | None = None
        try:
            self.fetches += 1
            raw = self._lookup_conn().hget(self.key, token)
            if raw is not None:
                self._apply_entry(token, raw)
                answer = self.lookup(token)
            if answer is None:
                with self._lock:
                    self._negative[token] = time.monotonic() + self.NEGATIVE_TTL
        except (redis.RedisError, OSError) as e:
            log.debug("fleet challenges: lookup of %s failed: %s", token[:12], e)
        except Exception:  # the future must always complete
            log.exception("fleet challenges: lookup of %s failed", token[:12])
        finally:
            with self._lock:
                self._inflight.pop(token, None)
            future.set_result(answer)

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
            until = self._removed.get(token)
            if until is not None:
                if until > time.monotonic():
                    return  # removed here after it was sent
                with self._lock:
                    self._removed.pop(token, None)
            self._apply_entry(token, json.dumps({"k": msg.get("k"), "e": msg.get("e")}))
            entry = self._mirror.get(token)
            if entry is not None and self._listeners:
                self._notify("add", token, entry[0], entry[1])
        elif op == "del":
            with self._lock:
                self._mirror.pop(token, None)
            if self._listeners:
                self._notify("del", token, None, None)

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
            gone = [t for t in self._mirror if t not in fresh]
            self._mirror = fresh
        if self._listeners:
            for token, (key_authorization, expires_at) in fresh.items():
                self._notify("add", token, key_authorization, expires_at)
            for token in gone:
                self._notify("del", token, None, None)
        if expired:
            self.client.hdel(self.key, *expired)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fleet-challenges", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the mirror thread (joined, at most CLOSE_JOIN s: it wakes every
        0.2 s, a reconnect waits at most CONNECT_TIMEOUT), the fetch workers and
        the lookup connection. Idempotent; the registry answers nothing new after.
        The thread is a daemon thread only so that a creator that forgot this
        cannot hang the interpreter's exit: every creator must call it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.CLOSE_JOIN)
            if thread.is_alive():
                log.warning(
                    "fleet challenges: the mirror thread did not stop within %.0f s",
                    self.CLOSE_JOIN,
                )
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            left, self._inflight = list(self._inflight.values()), {}
        for future in left:  # cancelled before they ran: answer "unknown"
            if not future.done():
                with contextlib.suppress(Exception):
                    future.set_result(None)
        if self._lookup_client is not None:
            with contextlib.suppress(Exception):
                self._lookup_client.close()

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
#     NS:node:NODE  {"node", "host", "pid", "started", "seen" (UNIX s),
#                    "serials": {cert: serial its HAProxy serves (hex) | null},
#                    "key_mismatch": [cert refused: the node's key does not match],
#                    "answer": "spoe" | "map",
#                    "next_keys": {cert: SPKI pin of its next_key file here | null}}
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
    extra: dict[str, Any] | None = None,
) -> None:
    """Record that `node` is alive now (for `ttl` seconds), with `serials`: per
    certificate the serial its HAProxy instances serve (the daemon reads it
    from its deployer: every instance the same serial, else null), and the
    `extra` fields (the daemon adds "key_mismatch")."""
    import os
    import socket

    record = {
        "node": node,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "seen": time.time(),
        "serials": serials or {},
        **(extra or {}),
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
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.client, self.namespace, self.node = client, namespace, node
        self.serials, self.interval, self.ttl = serials, interval, ttl
        self.extra = extra
        self.started = time.time()
        self._stop = threading.Event()
        self._kick = threading.Event()
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
                    extra=self.extra() if self.extra is not None else None,
                )  # fmt: skip
            except (redis.RedisError, OSError) as e:
                log.warning("fleet heartbeat of node %s failed: %s", self.node, e)
            self._kick.wait(self.interval)
            self._kick.clear()
            if self._stop.is_set():
                return

    def beat_now(self) -> None:
        """Beat at once (after a deploy changed what this node serves), not at the interval."""
        self._kick.set()

    def stop(self) -> None:
        """Stop beating and drop our record (the others see us gone at once)."""
        self._stop.set()
        self._kick.set()
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
    `connected` is set while subscribed. The callbacks run on this thread.

    `on_connect()` runs after every successful (re)subscription, the first one
    included: messages published while we were not subscribed are lost, so
    the caller compares serials then (a catch-up pass) instead of trusting
    that it saw every message. `connects` counts them."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        on_change: Callable[[str, str, int | None, str], object],
        on_connect: Callable[[], object] | None = None,
    ) -> None:
        self.client, self.channel, self.on_change = client, f"{namespace}:certificates", on_change
        self.on_connect = on_connect
        self.connects = 0
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
            pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                # The subscription is confirmed only by its reply: read it
                # before calling it connected, so a catch-up started now
                # cannot miss a message published right after it.
                for _ in range(50):
                    reply = pubsub.get_message(timeout=0.1)
                    if reply is not None and reply.get("type") == "subscribe":
                        break
                else:
                    raise redis.ConnectionError("no reply to SUBSCRIBE")
                self.connected.set()
                self.connects += 1
                backoff = 0.05
                if self.on_connect is not None:
                    try:
                        self.on_connect()
                    except Exception:
                        log.exception("fleet: the catch-up after (re)connecting failed")
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
