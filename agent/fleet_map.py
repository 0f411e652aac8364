"""Map answer mode in a fleet: every node's HAProxy holds every pending token.

The CA validates http-01 against whichever node DNS or anycast hands it, so
with `[challenges] answer = "map"` a token must be in the map of EVERY node's
HAProxy before the CA is told to validate, not only in the ordering node's.

- The ordering node's `HAProxyMapRegistry.add` puts the token into the shared
  registry (agent.fleet.RedisChallengeRegistry: HSET + PUBLISH, acknowledged
  by the Redis primary), then into its own instances' maps, then
  `PeerAcks.wait`s until every other LIVE map-mode node acknowledged it.
  A node that does not within `[challenges] map_timeout` fails the order
  before the CA is asked (ChallengeMapError names the nodes), exactly as an
  unreachable local instance does. Nodes whose heartbeat expired (dead, cut
  off) are not waited for: the CA cannot reach them through their HAProxy
  either, or if it can, that HAProxy cannot answer - a risk the operator sees
  as `haproxy_acme_fleet_nodes` dropping.
- Every node's daemon runs a `MapFollower`: the registry's mirror thread hands
  it each token it learns (pub/sub or a resynchronisation after a reconnect);
  a worker thread `mirror`s it into this node's instances and, once all of
  them took it, acknowledges it. An instance that failed is retried every
  RETRY s until the token expires, and `HAProxyMapRegistry.poll` re-adds
  pending tokens to an instance that restarted. Removals are mirrored too.

Redis keys (under the fleet's namespace NS):

    NS:challenge-acks:TOKEN   set of the nodes whose HAProxy holds TOKEN,
                              expiring with the token (at most ACK_TTL_MAX s)

Heartbeats carry `"answer": "map" | "spoe"` (agent.daemon), which is how the
ordering node knows whom to wait for.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import redis

from agent.challenge_map import ChallengeMapError, HAProxyMapRegistry
from agent.fleet import RedisChallengeRegistry, list_nodes

log = logging.getLogger("agent.fleet_map")

ACK_TTL_MAX = 3600.0  # s: an ack never outlives this, whatever the token's expiry
POLL = 0.05  # s between looks at the acks while an order waits
RETRY = 0.25  # s between retries of a token an instance did not take


def ack_key(namespace: str, token: str) -> str:
    return f"{namespace}:challenge-acks:{token}"


class PeerAcks:
    """This node's view of the other map-mode nodes (see the module).

    `clock`: UNIX seconds (token expiry); waits use time.monotonic and `sleep`.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        node: str,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.node = node
        self._clock = clock
        self._sleep = sleep

    def acknowledge(self, token: str, expires_at: float) -> None:
        """Record that this node's HAProxy holds `token` (raises redis errors)."""
        ttl = min(max(expires_at - self._clock(), 1.0), ACK_TTL_MAX)
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(ack_key(self.namespace, token), self.node)
        pipe.pexpire(ack_key(self.namespace, token), int(ttl * 1000))
        pipe.execute()

    def waiting_for(self, token: str) -> set[str]:
        """The live map-mode nodes other than this one that have not acknowledged `token`."""
        wanted = {
            str(n["node"])
            for n in list_nodes(self.client, self.namespace)
            if n.get("alive") and n.get("answer") == "map" and n["node"] != self.node
        }
        if not wanted:
            return set()
        acked = {
            m.decode() if isinstance(m, bytes) else str(m)
            for m in self.client.smembers(ack_key(self.namespace, token))  # type: ignore[union-attr]
        }
        return wanted - acked

    def wait(self, token: str, timeout: float) -> None:
        """Return once every other live map-mode node acknowledged `token`; raise
        ChallengeMapError naming the ones that did not within `timeout` s (bounded:
        at most timeout / POLL + 1 looks)."""
        deadline = time.monotonic() + timeout
        waited = 0.0
        missing: set[str] = set()
        for _ in range(int(timeout / POLL) + 2):
            try:
                missing = self.waiting_for(token)
            except (redis.RedisError, OSError) as e:
                raise ChallengeMapError(
                    f"challenge map: cannot tell whether the other fleet nodes hold the token "
                    f"(Redis: {e}), so the CA was not asked to validate",
                    f"node {self.node}",
                    None,
                ) from None
            if not missing:
                return
            if time.monotonic() >= deadline or waited >= timeout:
                break
            self._sleep(POLL)
            waited += POLL
        names = ", ".join(sorted(missing))
        raise ChallengeMapError(
            f"challenge map: fleet node(s) {names} did not put the token into their HAProxy "
            f"within {timeout:g} s ([challenges] map_timeout), so the CA was not asked to "
            f"validate; see those nodes' logs",
            f"node {sorted(missing)[0]}",
            None,
        )


class MapFollower:
    """Daemon side, on every map-mode node: mirror the fleet's tokens into this
    node's HAProxy maps and acknowledge them (see the module). `start()` starts
    its worker thread; `stop()` ends it (bounded)."""

    def __init__(
        self,
        registry: RedisChallengeRegistry,
        maps: HAProxyMapRegistry,
        acks: PeerAcks,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.maps = maps
        self.acks = acks
        self._clock = clock
        self._queue: queue.Queue[tuple[str, str, str | None, float | None]] = queue.Queue()
        self._unacked: dict[str, tuple[str, float]] = {}  # token -> (keyauth, expires_at)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-map", daemon=True)
        self.mirrored = 0  # tokens this node's instances all took (tests, metrics)

    def start(self) -> MapFollower:
        self.registry.add_listener(self._on_event)
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """End the worker (after the token it is pushing, if any); `wait`: join it
        (at most 10 s). The event loop passes False: it must not block."""
        self.registry.remove_listener(self._on_event)
        self._stop.set()
        self._queue.put(("stop", "", None, None))
        if wait and self._thread.is_alive():
            self._thread.join(10)

    def _on_event(self, op: str, token: str, key_authorization: str | None,
                  expires_at: float | None) -> None:  # fmt: skip
        self._queue.put((op, token, key_authorization, expires_at))  # never blocks

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                op, token, key_authorization, expires_at = self._queue.get(
                    timeout=RETRY if self._unacked else 1.0
                )
            except queue.Empty:
                self._retry()
                continue
            if op == "stop":
                break
            try:
                if op == "add" and key_authorization is not None and expires_at is not None:
                    self._add(token, key_authorization, expires_at)
                elif op == "del":
                    self._unacked.pop(token, None)
                    self.maps.unmirror(token)
            except Exception:  # one bad token never stops the follower
                log.exception("challenge map: cannot mirror fleet token %s", token[:12])

    def _add(self, token: str, key_authorization: str, expires_at: float) -> None:
        if expires_at <= self._clock():
            self._unacked.pop(token, None)
            return
        failed = self.maps.mirror(token, key_authorization, expires_at)
        if failed:
            self._unacked[token] = (key_authorization, expires_at)
            return
        try:
            self.acks.acknowledge(token, expires_at)
        except (redis.RedisError, OSError) as e:
            log.warning("challenge map: cannot acknowledge fleet token %s: %s", token[:12], e)
            self._unacked[token] = (key_authorization, expires_at)
            return
        self._unacked.pop(token, None)
        self.mirrored += 1

    def _retry(self) -> None:
        for token, (key_authorization, expires_at) in list(self._unacked.items()):
            if self._stop.is_set():
                return
            self._add(token, key_authorization, expires_at)
