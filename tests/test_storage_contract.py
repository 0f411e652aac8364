"""The `Storage` contract, run against every implementation: the file store and
the Redis store (agent.store_redis, against a real redis-server on 127.0.0.1).

An implementation is registered with two functions:
- `open(spec)`: a new handle on the same backend (as another process would
  open it; `spec` is a string so child processes can open one too: the state
  dir for files, JSON {url, ns, secret} for Redis);
- `plant(handle, name, owner)`: write a lock record as another holder would
  have left it (a killed run on another host, PID 1 of an earlier container).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agent.storage import (
    FenceRejected,
    FileStorage,
    LockLost,
    LockOwner,
    LockTimeout,
    Storage,
    StorageKeyError,
    holder_is_gone,
    process_start_time,
)
from agent.store_redis import RedisStorage
from tests.support.redis import redis_available, shared_redis


def _open_file(spec: str) -> Storage:
    return FileStorage(Path(spec))


def _plant_file(store: Storage, name: str, owner: LockOwner) -> None:
    assert isinstance(store, FileStorage)
    path = store.root / "locks" / f"{name}.lock"
    store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.mkdir(exist_ok=True, mode=0o700)
    path.write_text(json.dumps(owner.to_json()))


def _open_redis(spec: str) -> Storage:
    s = json.loads(spec)
    client = redis.Redis.from_url(s["url"], socket_timeout=10)
    return RedisStorage(client, s["ns"], bytes.fromhex(s["secret"]))


def _plant_redis(store: Storage, name: str, owner: LockOwner) -> None:
    assert isinstance(store, RedisStorage)
    ms = int((owner.expires - time.time()) * 1000)
    # An expired record is planted without a TTL: the lease in it says it is over.
    store.client.set(store._lkey(name), json.dumps(owner.to_json()), px=ms if ms > 0 else None)


IMPLEMENTATIONS: dict[str, tuple[Callable[[str], Storage], Callable[..., None]]] = {
    "file": (_open_file, _plant_file),
    "redis": (_open_redis, _plant_redis),
}


@dataclasses.dataclass
class Backend:
    spec: str
    kind: str

    def open(self) -> Storage:
        return IMPLEMENTATIONS[self.kind][0](self.spec)

    def plant(self, store: Storage, name: str, owner: LockOwner) -> None:
        IMPLEMENTATIONS[self.kind][1](store, name, owner)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    if request.param == "redis":
        if not redis_available():
            pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
        server = shared_redis(tmp_path_factory)
        ns = "t" + os.urandom(8).hex()  # each test its own namespace on the shared server
        spec = json.dumps({"url": server.url, "ns": ns, "secret": os.urandom(32).hex()})
        yield Backend(spec, "redis")
        return
    yield Backend(str(tmp_path / "state"), request.param)


def _owner(**kw: Any) -> LockOwner:
    now = time.time()
    fields: dict[str, Any] = {
        "token": "t" * 32,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": process_start_time(os.getpid()),
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "acquired": now,
        "expires": now + 120,
    }
    fields.update(kw)
    return LockOwner(**fields)


# --- keys and values -----------------------------------------------------------------


def test_store_load_delete_list_stat(backend: Backend) -> None:
    st = backend.open()
    st.store("certificates/www/gen/1/cert.pem", b"cert")
    st.store("certificates/www/current", b"1")
    st.store("accounts/ca/account.key", b"k", secret=True)
    assert st.load("certificates/www/current") == b"1"
    assert backend.open().load("certificates/www/gen/1/cert.pem") == b"cert"  # another handle
    assert st.list("certificates/www") == ["certificates/www/current", "certificates/www/gen"]
    assert st.list("certificates", recursive=True) == [
        "certificates/www/current", "certificates/www/gen/1/cert.pem",
    ]  # fmt: skip
    assert st.list("nothing/here") == []
    assert st.exists("certificates/www/current") and not st.exists("certificates/www/x")
    assert st.stat("certificates/www/gen/1/cert.pem").size == 4
    st.delete("certificates/www/current")
    st.delete("certificates/www/current")  # idempotent
    with pytest.raises(FileNotFoundError):
        st.load("certificates/www/current")
    st.delete_all("certificates/www")
    st.delete_all("certificates/www")
    assert st.list("certificates", recursive=True) == []
    assert st.load("accounts/ca/account.key") == b"k"


def test_load_many_returns_what_exists_and_refuses_bad_keys(backend: Backend) -> None:
    st = backend.open()
    st.store("certificates/www/current", b"1")
    st.store("certificates/api/state.json", b"{}")
    got = st.load_many(
        ["certificates/www/current", "certificates/nope/current", "certificates/api/state.json"]
    )
    assert got == {"certificates/www/current": b"1", "certificates/api/state.json": b"{}"}
    assert st.load_many([]) == {}
    with pytest.raises(StorageKeyError):
        st.load_many(["certificates/www/current", "a/../b"])


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", ".hidden", "a/", "a\\b"])
def test_invalid_keys_are_refused(backend: Backend, key: str) -> None:
    st = backend.open()
    with pytest.raises(StorageKeyError):
        st.store(key, b"x")
    with pytest.raises(StorageKeyError):
        st.load(key)


def test_a_reader_sees_the_whole_old_or_the_whole_new_value(backend: Backend) -> None:
    st = backend.open()
    a, b = b"a" * 300_000, b"b" * 200_000
    st.store("k", a)
    stop = threading.Event()

    def writer() -> None:
        for i in range(100):
            st.store("k", a if i % 2 else b)
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    reader = backend.open()
    seen = set()
    for _ in range(2000):
        if stop.is_set():
            break
        value = reader.load("k")
        assert value in (a, b)
        seen.add(value[:1])
    t.join(30)
    assert reader.load("k") in (a, b)


# --- locks -------------------------------------------------------------------------


def _count_under_lock(spec: str, kind: str, rounds: int) -> None:
    st = IMPLEMENTATIONS[kind][0](spec)
    for _ in range(rounds):
        with st.locked("counter", timeout=30):
            n = int(st.load("counter"))
            time.sleep(0.001)  # widen the window a lost update would need
            st.store("counter", str(n + 1).encode())


def test_lock_excludes_other_processes(backend: Backend) -> None:
    backend.open().store("counter", b"0")
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_count_under_lock, args=(backend.spec, backend.kind, 25))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert backend.open().load("counter") == b"100"


def test_lock_excludes_other_threads_and_times_out(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    token = a.lock("www", timeout=1)
    assert isinstance(token, str) and len(token) >= 16
    with pytest.raises(LockTimeout, match="held by another process"):
        b.lock("www", timeout=0.1)
    a.unlock("www", token)
    b.unlock("www", b.lock("www", timeout=1))


def test_the_lock_record_names_its_holder(backend: Backend) -> None:
    st = backend.open()
    token = st.lock("www", timeout=1, expires_after=60)
    owner = st.lock_owner("www")
    assert owner is not None
    assert owner.token == token and owner.pid == os.getpid()
    assert owner.host == socket.gethostname()
    assert owner.start_time == process_start_time(os.getpid())
    assert owner.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert owner.acquired <= owner.expires <= owner.acquired + 60
    st.unlock("www")
    assert st.lock_owner("www") is None


def test_a_lease_that_ran_out_is_taken_over_whoever_holds_it(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    a.lock("www", timeout=1, expires_after=0.2)  # alive, same process: only the lease ends
    token_b = b.lock("www", timeout=5)
    owner = b.lock_owner("www")
    assert owner is not None and owner.token == token_b


def test_unlock_after_a_takeover_leaves_the_new_holders_lock(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    token_a = a.lock("www", timeout=1, expires_after=0.2)
    token_b = b.lock("www", timeout=5)  # after a's lease ran out
    with pytest.raises(LockLost):
        a.unlock("www", token_a)
    owner = b.lock_owner("www")
    assert owner is not None and owner.token == token_b
    with pytest.raises(LockTimeout):
        a.lock("www", timeout=0.1)  # still b's
    with pytest.raises(LockLost):
        a.renew_lock("www", token_a)
    b.unlock("www", token_b)


def test_a_renewed_lease_keeps_the_lock(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    with a.locked("www", timeout=1, expires_after=1.0) as token:
        # Held for several leases: the renewer thread keeps extending it.
        with pytest.raises(LockTimeout):
            b.lock("www", timeout=2.5)
        owner = a.lock_owner("www")
        assert owner is not None and owner.token == token
    b.unlock("www", b.lock("www", timeout=1))


def test_explicit_renewal_extends_the_lease(backend: Backend) -> None:
    a = backend.open()
    token = a.lock("www", timeout=1, expires_after=5)
    before = a.lock_owner("www")
    a.renew_lock("www", token, 100)
    after = a.lock_owner("www")
    assert before is not None and after is not None
    assert after.token == token and after.expires > before.expires + 50
    a.unlock("www", token)


def test_a_killed_holder_on_another_host_blocks_until_its_lease_ends(backend: Backend) -> None:
    st = backend.open()
    now = time.time()
    # A `docker run --rm` killed 20 minutes ago: another host name, PID 1.
    backend.plant(st, "www", _owner(host="c0ffee123456", pid=1, start_time=5, boot_id="x",
                                    acquired=now - 1200, expires=now - 1080))  # fmt: skip
    st.unlock("www", st.lock("www", timeout=1))
    # One on another host whose lease still runs is respected (its PID means nothing here).
    backend.plant(st, "www", _owner(host="c0ffee123456", pid=999_999_999, expires=now + 600))
    with pytest.raises(LockTimeout):
        st.lock("www", timeout=0.2)


def test_a_dead_or_recycled_pid_on_this_host_is_stale_at_once(backend: Backend) -> None:
    st = backend.open()
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    backend.plant(st, "www", _owner(pid=dead.pid, start_time=None, expires=time.time() + 600))
    st.unlock("www", st.lock("www", timeout=1))
    # PID 1 is alive, but it is not the process that took the lock: another start time.
    pid1 = process_start_time(1)
    if pid1 is None:
        pytest.skip("/proc/1/stat is not readable here")
    backend.plant(st, "www", _owner(pid=1, start_time=pid1 + 1000, expires=time.time() + 600))
    st.unlock("www", st.lock("www", timeout=1))
    # The same PID with its real start time is a live holder: respected.
    backend.plant(st, "www", _owner(pid=1, start_time=pid1, expires=time.time() + 600))
    with pytest.raises(LockTimeout):
        st.lock("www", timeout=0.2)


def test_holder_is_gone_rules() -> None:
    now = time.time()
    assert holder_is_gone(_owner(expires=now - 1), now)  # lease over, even for ourselves
    assert not holder_is_gone(_owner(), now)  # ourselves, alive
    assert not holder_is_gone(_owner(host="elsewhere", pid=999_999_999), now)
    assert not holder_is_gone(_owner(pid=999_999_999, boot_id="another-boot"), now)
    assert holder_is_gone(_owner(pid=999_999_999), now)


# --- fencing -------------------------------------------------------------------------


def test_every_acquisition_gets_a_larger_fencing_number(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    token = a.lock("cert-www", timeout=1)
    first = a.fence("cert-www")
    a.unlock("cert-www", token)
    with pytest.raises(RuntimeError):
        a.fence("cert-www")  # not held any more
    token = b.lock("cert-www", timeout=1)
    assert b.fence("cert-www") > first
    b.unlock("cert-www", token)


def test_try_lock_many_takes_the_free_locks_and_leaves_the_held_ones(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    held_by_b = b.lock("cert-api", timeout=1)
    before = _fence_after_one_hold(b, "cert-www")
    got = a.try_lock_many(["cert-www", "cert-api", "cert-www", "cert-db"], expires_after=30)
    assert sorted(got) == ["cert-db", "cert-www"]  # not cert-api: b holds it
    assert a.fence("cert-www") > before  # a real acquisition, with its fencing number
    owner = b.lock_owner("cert-www")
    assert owner is not None and owner.token == got["cert-www"] and owner.pid == os.getpid()
    with pytest.raises(LockTimeout):
        b.lock("cert-db", timeout=0.1)  # they exclude others until released
    assert a.try_lock_many([]) == {}
    # One of them taken over after its lease ran out: reported lost, left to its holder.
    b.unlock("cert-api", held_by_b)
    short = a.try_lock_many(["cert-api"], expires_after=0.2)
    time.sleep(0.5)
    taker = b.lock("cert-api", timeout=2)
    assert a.unlock_many({**got, **short}) == ["cert-api"]
    assert b.lock_owner("cert-api") is not None  # b's lock stays
    b.unlock("cert-api", taker)
    for name in ("cert-www", "cert-db"):
        b.unlock(name, b.lock(name, timeout=1))  # released
    assert a.unlock_many({}) == []


def _fence_after_one_hold(store: Storage, name: str) -> int:
    token = store.lock(name, timeout=1)
    fence = store.fence(name)
    store.unlock(name, token)
    return fence


def test_store_many_writes_every_value_as_store_does(backend: Backend) -> None:
    st = backend.open()
    st.store("certificates/www/state.json", b"old")
    values = {"certificates/www/state.json": b"new", "certificates/api/state.json": b"{}"}
    st.store_many(values)
    assert backend.open().load_many(values) == values
    assert st.list("certificates", recursive=True) == sorted(values)
    st.store_many({})
    with pytest.raises(StorageKeyError):
        st.store_many({"certificates/db/state.json": b"x", "a/../b": b"x"})


def test_a_fenced_commit_writes_the_values_and_the_fence_together(backend: Backend) -> None:
    st = backend.open()
    token = st.lock("cert-www", timeout=1)
    fence = st.fence("cert-www")
    st.commit_fenced("cert-www", token, fence, "certificates/www/fence",
                     {"certificates/www/current": b"gen-1"})  # fmt: skip
    assert st.load("certificates/www/current") == b"gen-1"
    assert int(st.load("certificates/www/fence")) == fence
    assert "certificates/www/fence" in st.list("certificates/www")
    st.unlock("cert-www", token)


def test_a_holder_whose_lease_ran_out_cannot_commit_over_its_successor(backend: Backend) -> None:
    stale, fresh = backend.open(), backend.open()
    old_token = stale.lock("cert-www", timeout=1, expires_after=0.2)
    old_fence = stale.fence("cert-www")
    new_token = fresh.lock("cert-www", timeout=5)  # after the stale lease ran out
    new_fence = fresh.fence("cert-www")
    fresh.commit_fenced("cert-www", new_token, new_fence, "certificates/www/fence",
                        {"certificates/www/current": b"new"})  # fmt: skip
    with pytest.raises(FenceRejected, match="lease"):
        stale.commit_fenced("cert-www", old_token, old_fence, "certificates/www/fence",
                            {"certificates/www/current": b"stale"})  # fmt: skip
    assert stale.load("certificates/www/current") == b"new"
    assert int(stale.load("certificates/www/fence")) == new_fence
    fresh.unlock("cert-www", new_token)


def test_a_commit_with_a_lower_fence_than_the_stored_one_is_refused(backend: Backend) -> None:
    st = backend.open()
    st.store("certificates/www/fence", b"1000000")  # a later holder's install
    st.store("certificates/www/current", b"theirs")
    token = st.lock("cert-www", timeout=1)  # our lease is fine, our number is older
    with pytest.raises(FenceRejected, match="1000000"):
        st.commit_fenced("cert-www", token, st.fence("cert-www"), "certificates/www/fence",
                         {"certificates/www/current": b"ours"})  # fmt: skip
    assert st.load("certificates/www/current") == b"theirs"
    st.unlock("cert-www", token)
