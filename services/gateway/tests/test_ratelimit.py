"""The rate limiters against the real thing: memory, and Redis (the local server, plus one started for a test)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from strata.common.procs import free_port
from strata.common.testing import eventually, in_ci
from strata.gateway.ratelimit import (
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    create_rate_limiter,
)

REDIS_URL = os.environ.get("STRATA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Slow enough that nothing refills while a test runs.
NO_REFILL = 0.001


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {type(exc).__name__}: {exc}"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: Redis is required)", pytrace=False)
        pytest.skip(reason)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_admin(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to look at what the limiter stored."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_admin: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"strata:test:rl:{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(redis_admin.scan_iter(match=prefix + "*"))
    if keys:
        redis_admin.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """Runs the test once on each implementation."""
    made: RateLimiter
    if request.param == "memory":
        made = MemoryRateLimiter()
    else:
        made = RedisRateLimiter(request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix"))
    yield made
    await made.close()


async def test_burst_is_allowed_then_refused_until_retry_after(limiter: RateLimiter) -> None:
    limit = Limit(rate_per_s=5, burst=3)
    decisions = [await limiter.hit("client", limit) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.retry_after_s for d in decisions[:3]] == [0.0, 0.0, 0.0]
    refused = decisions[3]
    assert refused.limit == limit
    assert 0.15 < refused.retry_after_s <= 0.2  # one token at 5/s, less what trickled in meanwhile

    await asyncio.sleep(refused.retry_after_s / 2)
    early = await limiter.hit("client", limit)
    assert not early.allowed
    assert 0 < early.retry_after_s < refused.retry_after_s

    await asyncio.sleep(early.retry_after_s + 0.02)
    assert (await limiter.hit("client", limit)).allowed


async def test_tokens_refill_over_time_up_to_burst(limiter: RateLimiter) -> None:
    limit = Limit(rate_per_s=20, burst=10)
    assert all([(await limiter.hit("client", limit)).allowed for _ in range(10)])
    assert not (await limiter.hit("client", limit)).allowed

    await asyncio.sleep(0.25)  # 5 tokens at 20/s
    allowed = sum([(await limiter.hit("client", limit)).allowed for _ in range(10)])
    assert 4 <= allowed <= 6

    await asyncio.sleep(0.6)  # more than enough to fill up: the bucket holds no more than burst
    decision = await limiter.hit("client", limit)
    assert decision.allowed
    assert decision.remaining == 9


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    limit = Limit(rate_per_s=NO_REFILL, burst=2)
    assert [(await limiter.hit("a", limit)).allowed for _ in range(3)] == [True, True, False]
    other = await limiter.hit("b", limit)
    assert other.allowed
    assert other.remaining == 1
    assert not (await limiter.hit("a", limit)).allowed


async def test_cost_takes_that_many_tokens(limiter: RateLimiter) -> None:
    limit = Limit(rate_per_s=1, burst=10)
    assert [(await limiter.hit("client", limit, cost=4)).remaining for _ in range(2)] == [6, 2]
    refused = await limiter.hit("client", limit, cost=4)
    assert not refused.allowed
    assert refused.remaining == 2  # a refused hit takes nothing
    assert 1.9 < refused.retry_after_s <= 2.0  # until 4 tokens are there, not just one
    last = await limiter.hit("client", limit, cost=2)
    assert last.allowed
    assert last.remaining == 0


@pytest.mark.parametrize("cost", [0, -1, 11])
async def test_a_cost_that_can_never_be_paid_is_an_error(limiter: RateLimiter, cost: float) -> None:
    with pytest.raises(ValueError, match="cost must be"):
        await limiter.hit("client", Limit(rate_per_s=1, burst=10), cost=cost)


async def test_concurrent_hits_allow_exactly_burst(limiter: RateLimiter) -> None:
    limit = Limit(rate_per_s=NO_REFILL, burst=10)
    decisions = await asyncio.gather(*(limiter.hit("client", limit) for _ in range(50)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert sorted(d.remaining for d in allowed) == list(range(10))  # each token handed out once


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20/s", Limit(rate_per_s=20, burst=20)),
        ("300/min", Limit(rate_per_s=5, burst=300)),
        ("5/min;burst=5", Limit(rate_per_s=5 / 60, burst=5)),
        ("20/s;burst=60", Limit(rate_per_s=20, burst=60)),
        (" 3600 / hour ; burst = 10 ", Limit(rate_per_s=1, burst=10)),
        ("1000/day", Limit(rate_per_s=1000 / 86400, burst=1000)),
        ("0.5/s", Limit(rate_per_s=0.5, burst=1)),
        ("10/SEC", Limit(rate_per_s=10, burst=10)),
    ],
)
def test_limit_parse_accepts(text: str, expected: Limit) -> None:
    assert Limit.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fast",
        "20",
        "20/",
        "/s",
        "20/fortnight",
        "0/s",
        "-5/s",
        "20/s;burst=0",
        "20/s;burst=x",
        "20/s;burst=2.5",
        "20/s;bust=5",
        "20/s;burst=5;burst=6",
        "20/s burst=5",
        "nan/s",
        "inf/s",
    ],
)
def test_limit_parse_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rate limit"):
        Limit.parse(text)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("nan"), 1), (float("inf"), 1), (1, 0)])
def test_limit_rejects_impossible_values(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        Limit(rate_per_s=rate, burst=burst)


async def test_two_redis_replicas_share_one_bucket(redis_url: str, redis_prefix: str) -> None:
    one, two = RedisRateLimiter(redis_url, prefix=redis_prefix), RedisRateLimiter(redis_url, prefix=redis_prefix)
    try:
        limit = Limit(rate_per_s=NO_REFILL, burst=4)
        decisions = [await replica.hit("client", limit) for replica in (one, two, one, two, one)]
        assert [d.allowed for d in decisions] == [True, True, True, True, False]
        assert [d.remaining for d in decisions] == [3, 2, 1, 0, 0]

        both = await asyncio.gather(*(replica.hit("other", limit) for replica in (one, two) * 10))
        assert sum(d.allowed for d in both) == 4
    finally:
        await one.close()
        await two.close()


async def test_idle_redis_buckets_expire(redis_url: str, redis_prefix: str, redis_admin: redis.Redis) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix)
    try:
        await limiter.hit("slow", Limit.parse("5/min"))
        # One token short of full at 1 per 12 s: 12 s to refill, plus the one-second margin.
        assert 12_000 < redis_admin.pttl(redis_prefix + "slow") <= 13_000

        limit = Limit(rate_per_s=20, burst=2)
        await limiter.hit("fast", limit)
        ttl_ms = redis_admin.pttl(redis_prefix + "fast")
        assert 1_000 < ttl_ms <= 1_050  # 50 ms to refill + the margin
        await eventually(lambda: not redis_admin.exists(redis_prefix + "fast"), timeout_s=3)
        assert (await limiter.hit("fast", limit)).remaining == 1  # gone means full
    finally:
        await limiter.close()


async def test_memory_limiter_stays_bounded_and_evicts_least_recently_used() -> None:
    limiter = MemoryRateLimiter(max_keys=100)
    limit = Limit(rate_per_s=NO_REFILL, burst=1)
    await limiter.hit("old", limit)
    await limiter.hit("hot", limit)
    for i in range(1_000):
        await limiter.hit(f"key-{i}", limit)
        if i % 50 == 0:
            assert not (await limiter.hit("hot", limit)).allowed  # in use, so kept, and still empty
        assert len(limiter) <= 100
    assert len(limiter) == 100
    assert not (await limiter.hit("hot", limit)).allowed
    assert (await limiter.hit("old", limit)).allowed  # forgotten: a fresh, full bucket


@pytest.fixture
async def broken_redis_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A Redis URL where Redis is down: nothing listens, a server accepts and says nothing, or one that is not Redis."""
    kind = request.param
    if kind == "closed port":
        yield f"redis://127.0.0.1:{free_port()}/0"
        return
    writers: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if kind == "not redis":
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
        await reader.read()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("broken_redis_url", ["closed port", "silent", "not redis"], indirect=True)
async def test_redis_down_fails_open_and_warns_once(broken_redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisRateLimiter(broken_redis_url, recheck_s=0, timeout_s=0.1)
    limit = Limit(rate_per_s=NO_REFILL, burst=1)
    try:
        with caplog.at_level(logging.WARNING, logger="strata.gateway.ratelimit"):
            started = time.monotonic()
            decisions = [await limiter.hit("client", limit) for _ in range(3)]  # each one asks Redis again
            elapsed = time.monotonic() - started
    finally:
        await limiter.close()
    assert all(d.allowed for d in decisions)
    assert elapsed < 1.5  # bounded by the timeouts
    warnings = [r for r in caplog.records if r.name == "strata.gateway.ratelimit"]
    assert len(warnings) == 1
    assert "Redis is not usable" in warnings[0].getMessage()


@pytest.mark.parametrize("broken_redis_url", ["silent"], indirect=True)
async def test_after_a_failure_redis_is_left_alone_for_a_while(broken_redis_url: str) -> None:
    limiter = RedisRateLimiter(broken_redis_url, timeout_s=0.2, recheck_s=10)
    limit = Limit(rate_per_s=NO_REFILL, burst=1)
    try:
        started = time.monotonic()
        assert (await limiter.hit("client", limit)).allowed
        first = time.monotonic() - started
        started = time.monotonic()
        assert all([(await limiter.hit("client", limit)).allowed for _ in range(20)])
        rest = time.monotonic() - started
    finally:
        await limiter.close()
    assert first >= 0.2  # waited for the silent server once
    assert rest < 0.1  # and then not again


class RedisServer:
    """A redis-server of one test's own, which the test may start late."""

    def __init__(self, tmp_path: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.dir = tmp_path
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.dir / "redis.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                cwd=self.dir,
                stdout=log,
                stderr=log,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start: {(self.dir / 'redis.log').read_text()}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


async def test_limits_apply_again_once_redis_answers(own_redis: RedisServer) -> None:
    limiter = RedisRateLimiter(own_redis.url, recheck_s=0.1)
    limit = Limit(rate_per_s=NO_REFILL, burst=1)
    try:
        assert [(await limiter.hit("client", limit)).allowed for _ in range(3)] == [True, True, True]
        own_redis.start()  # a new server: the script is not loaded there (NOSCRIPT), and the bucket is new
        await asyncio.sleep(0.15)
        assert [(await limiter.hit("client", limit)).allowed for _ in range(2)] == [True, False]

        client = redis.Redis.from_url(own_redis.url)
        client.script_flush()  # as after a restart or failover
        client.close()
        assert not (await limiter.hit("client", limit)).allowed
    finally:
        await limiter.close()


async def test_create_rate_limiter_picks_by_url() -> None:
    for url in (None, ""):
        memory = create_rate_limiter(url)
        assert isinstance(memory, MemoryRateLimiter)
        await memory.close()
    shared = create_rate_limiter("redis://127.0.0.1:6379/0")  # connects on first use, not here
    assert isinstance(shared, RedisRateLimiter)
    await shared.close()
