"""The composition root: which concrete storage, challenge registry, issuer and
deployer a config gets. Every command and the daemon build them here, so fleet
mode is decided in one place.

Without [fleet] (config.fleet is None): `FileStorage(state_dir)` and
`MemoryChallengeRegistry()`, exactly as before. With [fleet]: `RedisStorage`
and `RedisChallengeRegistry` on the client `agent.fleet.redis_client` builds,
under the fleet's namespace, secrets encrypted with `secret_file`.
Nothing here does I/O for the embedded default; the Redis objects connect
lazily (the registry starts its mirror thread, which retries on its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.challenges import ChallengeRegistry, MemoryChallengeRegistry
from agent.config import Config
from agent.storage import FileStorage, Storage

if TYPE_CHECKING:
    from agent.challenge_map import HAProxyMapRegistry
    from agent.deploy import Deployer
    from agent.issuer import Issuer


def make_storage(config: Config) -> Storage:
    if config.fleet is None:
        return FileStorage(config.state_dir)
    from agent.fleet import redis_client
    from agent.store_redis import RedisStorage, load_secret

    fleet = config.fleet
    return RedisStorage(redis_client(fleet), fleet.namespace, load_secret(fleet.secret_file))


def make_registry(config: Config) -> ChallengeRegistry:
    if config.fleet is None:
        return MemoryChallengeRegistry()
    from agent.fleet import RedisChallengeRegistry, redis_client

    return RedisChallengeRegistry(redis_client(config.fleet), config.fleet.namespace)


def make_map_registry(config: Config, inner: ChallengeRegistry) -> HAProxyMapRegistry | None:
    """answer = "map": the HAProxy map registry around `inner` (None otherwise).
    With [fleet] its `add` also waits for the other live map-mode nodes
    (agent.fleet_map.PeerAcks), so a token is in every node's HAProxy first."""
    from agent import challenge_map

    if config.challenges.answer != "map":
        return None
    peers = None
    if config.fleet is not None:
        from agent.fleet import redis_client
        from agent.fleet_map import PeerAcks

        peers = PeerAcks(redis_client(config.fleet), config.fleet.namespace, config.fleet.node)
    return challenge_map.from_config(config, inner, peers)


def make_issuer(config: Config, storage: Storage, registry: ChallengeRegistry) -> Issuer:
    from agent.issuer import Issuer
    from agent.solvers import build_solvers

    return Issuer(config.acme, storage, registry, solvers=build_solvers(config, storage))


def make_deployer(config: Config) -> Deployer:
    from agent.deploy import Deployer

    return Deployer.from_config(config)
