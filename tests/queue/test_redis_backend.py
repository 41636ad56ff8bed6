"""What only the Redis queue backend has to prove: slots, leftovers, atomicity, key text."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from hardening import BackendUnavailable, ConfigurationError, FakeClock
from hardening.queue.job import JobError, NewJob, new_job_id
from tests.queue.conftest import new_job

pytest.importorskip("redis")

from hardening.queue.backends.redis import RedisBackend

if TYPE_CHECKING:
    import redis

QUEUE = "q"
ODD_QUEUES = ["q", "", "a{b}c", "}x", "{}", "%7B", "ünï ✓", "a:b*c"]


def _new(queue: str = QUEUE, now: float = 1_700_000_000.0, **fields: Any) -> NewJob:
    return new_job(queue, now, **fields)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def backend(redis_client: redis.Redis, redis_prefix: str, clock: FakeClock) -> RedisBackend:
    return RedisBackend(redis_client, clock=clock, key_prefix=redis_prefix.rstrip(":"))


def _keys(client: Any, prefix: str) -> set[str]:
    return {k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=f"{prefix}*")}


# --- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", ODD_QUEUES)
def test_a_queue_lives_in_one_slot(queue: str) -> None:
    """Every key of a queue, whatever its name, hashes to one Cluster slot."""
    from redis.crc import key_slot

    backend = RedisBackend(_Unused(), key_prefix="app")
    keys = [*backend.queue_keys(queue), backend.job_key(queue, new_job_id())]
    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_queue_names_never_share_keys() -> None:
    """Distinct queue names, braces and percent signs included, get distinct keys."""
    backend = RedisBackend(_Unused(), key_prefix="app")
    assert len({backend.queue_keys(q)[0] for q in ODD_QUEUES}) == len(ODD_QUEUES)


def test_key_layout_is_prefix_then_tagged_queue() -> None:
    """Keys read ``<prefix>:{<queue>}:<part>``, so one SCAN of the prefix finds them all."""
    backend = RedisBackend(_Unused(), key_prefix="app")
    assert backend.queue_keys("mail")[0] == "app:{mail}:ready"
    assert backend.job_key("mail", "abc") == "app:{mail}:job:abc"


@pytest.mark.parametrize("prefix", ["", "a{b", "x}"])
def test_prefix_with_braces_refused(prefix: str) -> None:
    """A prefix that would move or empty the hash tag is a configuration error."""
    with pytest.raises(ConfigurationError):
        RedisBackend(_Unused(), key_prefix=prefix)


def test_async_client_refused() -> None:
    """The backend is blocking; an asyncio client is refused up front."""
    import redis.asyncio

    client = redis.asyncio.Redis()
    with pytest.raises(ConfigurationError):
        RedisBackend(client)


class _Unused:
    """A client stand-in for tests that only compute keys."""

    def register_script(self, script: str) -> object:
        return object()


# --- behaviour specific to the Lua scripts ------------------------------------------------


def test_times_keep_full_precision(redis_client: redis.Redis, redis_prefix: str) -> None:
    """Microsecond timestamps survive the scripts exactly (no 14-digit Lua formatting)."""
    clock = FakeClock(1_700_000_000.123457)
    backend = RedisBackend(redis_client, clock=clock, key_prefix=redis_prefix.rstrip(":"))
    now = clock.time()
    job = backend.enqueue(_new(now=now, run_at=now))
    (claimed,) = backend.claim(QUEUE, worker="w", limit=1, lease=30.000001)
    assert claimed.lease_expires_at == now + 30.000001
    clock.advance(1.000001)
    done = backend.ack(claimed)
    stored = backend.get(QUEUE, job.id)
    assert stored == done
    assert (stored.created_at, stored.run_at) == (now, now)
    assert stored.finished_at == clock.time()
    assert stored.history[0].started_at == now
    assert stored.history[0].finished_at == clock.time()


def test_get_rebuilds_the_whole_job(backend: RedisBackend, clock: FakeClock) -> None:
    """Payload, history, last error, worker and dedupe key come back as stored."""
    payload = '{"text":"ünï ✓ \\"quoted\\"","n":[1,2.5,null,true]}'
    job = backend.enqueue(_new(now=clock.time(), payload=payload, dedupe_key="k", priority=-3))
    (claimed,) = backend.claim(QUEUE, worker='host:1 "w"', limit=1, lease=30)
    error = JobError("ValueError", 'bad ✓ "x"', "Traceback...\n  line 1")
    failed = backend.fail(claimed, error, retry_at=clock.time() + 5)
    stored = backend.get(QUEUE, job.id)
    assert stored == failed
    assert stored.payload == {"text": 'ünï ✓ "quoted"', "n": [1, 2.5, None, True]}
    assert (stored.state, stored.priority, stored.dedupe_key) == ("retrying", -3, "k")
    assert stored.last_error == error
    (attempt,) = stored.history
    assert (attempt.outcome, attempt.worker, attempt.error) == ("failed", 'host:1 "w"', error)
    assert stored.lease_token is None
    assert backend.get(QUEUE, "no-such-job") is None


def test_running_job_shows_its_open_attempt(backend: RedisBackend, clock: FakeClock) -> None:
    """A claimed job's history ends with its running attempt, as on every backend."""
    job = backend.enqueue(_new(now=clock.time()))
    (claimed,) = backend.claim(QUEUE, worker="w", limit=1, lease=30)
    stored = backend.get(QUEUE, job.id)
    assert stored == claimed
    assert [(a.number, a.outcome, a.worker) for a in stored.history] == [(1, "running", "w")]


def test_promoted_delayed_jobs_keep_run_at_order(backend: RedisBackend, clock: FakeClock) -> None:
    """Equal priorities run by run_at even when one was delayed and the other not."""
    now = clock.time()
    delayed = backend.enqueue(_new(now=now, run_at=now + 10))
    clock.advance(5)
    ready = backend.enqueue(_new(now=clock.time()))
    urgent = backend.enqueue(_new(now=clock.time(), run_at=now + 20, priority=1))
    clock.advance(20)
    claimed = backend.claim(QUEUE, worker="w", limit=3, lease=30)
    assert [j.id for j in claimed] == [urgent.id, ready.id, delayed.id]


@pytest.mark.parametrize(
    "dedupe_key", ["{page}:*", "*", "}{", "ünïcødé ✓", "a b\nc", "", "k" * 200]
)
def test_dedupe_keys_are_plain_text(
    backend: RedisBackend, clock: FakeClock, dedupe_key: str
) -> None:
    """Dedupe keys with braces, globs, unicode or nothing at all deduplicate exactly."""
    first = backend.enqueue(_new(now=clock.time(), dedupe_key=dedupe_key))
    assert backend.enqueue(_new(now=clock.time(), dedupe_key=dedupe_key)).id == first.id
    assert backend.enqueue(_new(now=clock.time(), dedupe_key=dedupe_key + "x")).id != first.id
    stored = backend.get(QUEUE, first.id)
    assert stored is not None
    assert stored.dedupe_key == dedupe_key
    backend.claim(QUEUE, worker="w", limit=1, lease=30)
    assert backend.enqueue(_new(now=clock.time(), dedupe_key=dedupe_key)).id != first.id


@pytest.mark.parametrize("queue", ODD_QUEUES)
def test_odd_queue_names_work(backend: RedisBackend, clock: FakeClock, queue: str) -> None:
    """Any queue name runs the whole cycle in its own keys."""
    job = backend.enqueue(_new(queue, now=clock.time()))
    assert backend.stats(queue).waiting == 1
    (claimed,) = backend.claim(queue, worker="w", limit=5, lease=30)
    assert backend.ack(claimed).id == job.id
    assert backend.stats("other").completed == 0


def test_nothing_left_behind(
    backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """Every key belongs to a live job or queue; purge and cleanup leave no key at all."""
    now = clock.time()
    for i in range(6):  # three jobs, each enqueued twice
        backend.enqueue(_new(now=now, dedupe_key=f"d{i % 3}", max_attempts=1))
    backend.enqueue(_new(now=now, max_attempts=1))
    backend.enqueue(_new(now=now, run_at=now + 50, max_attempts=1))
    first, second, third = backend.claim(QUEUE, worker="w", limit=3, lease=10)
    backend.ack(first)
    backend.fail(second, JobError("E", "x"), retry_at=None)
    backend.release(third)
    live = {backend.job_key(QUEUE, job.id) for job in (first, second, third)}
    keys = _keys(redis_client, redis_prefix)
    assert live <= keys
    for key in keys:  # a queue's own keys, or the hash of a job that is still there
        assert key in backend.queue_keys(QUEUE) or (
            key.startswith(backend.job_key(QUEUE, "")) and redis_client.hget(key, "state")
        )
    clock.advance(60)  # the delayed job is due; nothing is running
    for job in backend.claim(QUEUE, worker="w", limit=10, lease=10):
        backend.fail(job, JobError("E", "x"), retry_at=None)
    stats = backend.stats(QUEUE)
    assert (stats.waiting, stats.delayed, stats.running, stats.retrying) == (0, 0, 0, 0)
    assert backend.purge_dead(QUEUE) == stats.dead
    clock.advance(1)
    assert backend.cleanup(QUEUE, older_than=0) == stats.completed
    assert _keys(redis_client, redis_prefix) == set()


def test_cleanup_works_in_batches(backend: RedisBackend, clock: FakeClock) -> None:
    """More finished jobs than one batch are all deleted and counted."""
    for _ in range(2500):
        backend.enqueue(_new(now=clock.time()))
    while jobs := backend.claim(QUEUE, worker="w", limit=500, lease=30):
        for job in jobs:
            backend.ack(job)
    clock.advance(10)
    assert backend.cleanup(QUEUE, older_than=5) == 2500
    assert backend.stats(QUEUE).completed == 0


def test_concurrent_claims_take_each_job_once(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """8 threads on 8 connections claiming from 500 jobs: every job is claimed exactly once."""
    import redis as redis_py

    prefix = redis_prefix.rstrip(":")
    producer = RedisBackend(redis_client, clock=clock, key_prefix=prefix)
    enqueued = {producer.enqueue(_new(now=clock.time())).id for _ in range(500)}
    start = threading.Barrier(8, timeout=10)
    claimed: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        client = redis_py.Redis.from_url(redis_url)
        try:
            backend = RedisBackend(client, clock=clock, key_prefix=prefix)
            start.wait()
            while jobs := backend.claim(QUEUE, worker=f"w{index}", limit=3, lease=300):
                claimed[index].extend(job.id for job in jobs)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    every = [job_id for ids in claimed for job_id in ids]
    assert len(every) == len(set(every)) == 500
    assert set(every) == enqueued
    assert sum(1 for ids in claimed if ids) > 1  # the claims really were concurrent
    assert producer.stats(QUEUE).running == 500


def test_unreachable_redis_is_backend_unavailable(clock: FakeClock) -> None:
    """A dead server surfaces as BackendUnavailable, not a driver exception."""
    import redis as redis_py

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis_py.Redis(port=port, socket_connect_timeout=0.5)
    backend = RedisBackend(client, clock=clock)
    with pytest.raises(BackendUnavailable):
        backend.claim(QUEUE, worker="w", limit=1, lease=30)
    client.close()


def test_url_backend_owns_its_client(redis_url: str) -> None:
    """``backend_from_url`` builds a RedisBackend that closes its own client."""
    from hardening.queue import backend_from_url

    backend = backend_from_url(redis_url)
    assert isinstance(backend, RedisBackend)
    assert backend.owns_client
    backend.close()


# --- Redis Cluster -----------------------------------------------------------------------


@pytest.fixture
def cluster_client(redis_cluster_url: str) -> Iterator[Any]:
    from hardening._redis import client_from_url

    client = client_from_url(redis_cluster_url)
    try:
        yield client
    finally:
        client.close()


def test_cluster_runs_queues_on_several_nodes(cluster_client: Any, clock: FakeClock) -> None:
    """On a 3-node cluster, queues spread over nodes and each runs its scripts in one slot."""
    prefix = f"hardening-test:cluster-{new_job_id()[:8]}"
    backend = RedisBackend(cluster_client, clock=clock, key_prefix=prefix)
    queues = [f"queue-{i}" for i in range(12)]
    try:
        for queue in queues:
            backend.enqueue(_new(queue, now=clock.time(), dedupe_key="once"))
            backend.enqueue(_new(queue, now=clock.time(), dedupe_key="once"))
            backend.enqueue(_new(queue, now=clock.time(), priority=5))
            jobs = backend.claim(queue, worker="w", limit=5, lease=30)
            assert [j.priority for j in jobs] == [5, 0]
            if int(queue.rsplit("-", 1)[1]) % 2:  # one script in the queue's slot, or one per job
                assert [j.state for j in backend.ack_many(jobs) if j] == ["completed"] * 2
            else:
                for job in jobs:
                    backend.ack(job)
            stats = backend.stats(queue)
            assert (stats.waiting, stats.running, stats.completed) == (0, 0, 2)
        nodes = {cluster_client.get_node_from_key(backend.queue_keys(q)[0]).port for q in queues}
        assert len(nodes) >= 2
        clock.advance(1)
        assert sum(backend.cleanup(q, older_than=0) for q in queues) == 24
        assert list(cluster_client.scan_iter(match=f"{prefix}*")) == []
    finally:
        for key in cluster_client.scan_iter(match=f"{prefix}*"):
            cluster_client.delete(key)


def test_queue_rate_limit_is_shared_across_workers(redis_client: Any, redis_prefix: str) -> None:
    """On Redis, the queue-global rate limit is counted in Redis: all workers share it."""
    from hardening.queue import Job, QueueProcessor
    from hardening.queue.backends.redis import RedisBackend

    class Limited(QueueProcessor):
        queue = f"shared-{redis_prefix}"
        rate_limit = "3/minute"

        def process(self, job: Job) -> None:
            pass

    backend = RedisBackend(redis_client, key_prefix=redis_prefix.rstrip(":"))
    first, second = Limited(backend), Limited(backend)
    for i in range(3):
        first.enqueue(i)
    assert first.run_until_empty() == 3
    assert first._limiter is not None
    assert second._limiter is not None
    assert not second._limiter.peek(Limited.queue).allowed  # the other worker used it up
    first._limiter.reset(Limited.queue)


@pytest.mark.slow
def test_100k_due_jobs_never_block_redis_for_50ms(
    backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """100,000 delayed jobs fall due at once: every claim stays short (SLOWLOG), none lost."""
    now = clock.time()
    keys, job_prefix = backend.queue_keys(QUEUE), backend._job_prefix(QUEUE)
    enqueue = backend._scripts["enqueue"]
    pipe = redis_client.pipeline(transaction=False)
    for n in range(100_000):
        args = [job_prefix, repr(now), new_job_id(), QUEUE, "{}", "0", repr(now + 60)]
        enqueue(keys=keys, args=[*args, repr(now), "3", "0", ""], client=pipe)
        if n % 5_000 == 4_999:
            pipe.execute()
    pipe.execute()
    assert backend.stats(QUEUE).delayed == 100_000
    threshold = redis_client.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    length = redis_client.config_get("slowlog-max-len")["slowlog-max-len"]
    redis_client.config_set("slowlog-log-slower-than", 100)  # every claim is recorded
    redis_client.config_set("slowlog-max-len", 10_000)
    redis_client.slowlog_reset()
    clock.advance(61)
    claimed = 0
    try:
        for _ in range(400):
            jobs = backend.claim(QUEUE, worker="w", limit=500, lease=3600)
            claimed += len(jobs)
            if not jobs:
                break
        entries = redis_client.slowlog_get(10_000)
    finally:
        redis_client.config_set("slowlog-log-slower-than", threshold)
        redis_client.config_set("slowlog-max-len", length)
    assert claimed == 100_000
    marker = redis_prefix.rstrip(":").encode()
    claims = [
        e
        for e in entries
        if bytes(e["command"]).startswith(b"EVALSHA") and marker in bytes(e["command"])
    ]
    assert len(claims) >= 100
    longest = max(entry["duration"] for entry in claims)
    assert longest < 50_000, f"a claim took {longest / 1000:.1f} ms"
