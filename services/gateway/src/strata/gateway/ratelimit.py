"""Token-bucket rate limiting for the gateway: per process (memory) or shared by every replica (Redis).

A bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request takes ``cost`` tokens or is refused.
A bucket nobody has touched is full, so a limiter may forget any full bucket: that is what keeps both
implementations' memory bounded (LRU eviction here, a TTL in Redis) without giving anyone extra requests.

Keys are the caller's to namespace (``"user:42:queries"``); one key should always be hit with the same :class:`Limit`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_UNITS: dict[str, float] = {
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_LIMIT_RE = re.compile(
    r"^\s*(?P<count>\d+(?:\.\d+)?)\s*/\s*(?P<unit>[a-z]+)\s*(?:;\s*burst\s*=\s*(?P<burst>\d+)\s*)?$", re.IGNORECASE
)


@dataclass(frozen=True)
class Limit:
    """``rate_per_s`` tokens flow back per second into a bucket that holds at most ``burst``."""

    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive number, not {self.rate_per_s!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst!r}")

    @classmethod
    def parse(cls, text: str) -> Limit:
        """``"20/s"``, ``"300/min"``, ``"5/min;burst=5"``: the form settings hold.

        Without ``burst`` the bucket holds one period's worth (``"300/min"`` allows 300 at once), as a fixed-window
        limiter of the same spelling would.
        """
        match = _LIMIT_RE.match(text)
        unit = _UNITS.get(match["unit"].lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"invalid rate limit {text!r}: expected '<count>/<s|min|h|day>' with an optional ';burst=<n>', "
                "e.g. '20/s' or '300/min;burst=60'"
            )
        count = float(match["count"])
        if count <= 0:
            raise ValueError(f"invalid rate limit {text!r}: the count must be positive")
        burst = int(match["burst"]) if match["burst"] is not None else max(1, math.ceil(count))
        if burst < 1:
            raise ValueError(f"invalid rate limit {text!r}: burst must be at least 1")
        return cls(rate_per_s=count / unit, burst=burst)


@dataclass(frozen=True)
class Decision:
    """What one hit got: ``remaining`` whole tokens after it, and when refused, how long until it would succeed."""

    allowed: bool
    remaining: int
    retry_after_s: float
    limit: Limit


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: Limit, cost: float = 1.0) -> Decision: ...

    async def close(self) -> None: ...


def _check_cost(limit: Limit, cost: float) -> None:
    # A cost above burst could never be paid: refusing it forever would read as a rate limit, so it is a bug instead.
    if not (0 < cost <= limit.burst):
        raise ValueError(f"cost must be in (0, {limit.burst}] for a bucket of burst {limit.burst}, not {cost!r}")


class MemoryRateLimiter:
    """Buckets in this process: exact and free, but each gateway replica counts on its own.

    Hits never await, so they are atomic on the event loop. At most ``max_keys`` buckets are kept; the least recently
    used goes first. Those are almost always full by then (and a full bucket is the same as none); one that is not
    gets a fresh, full bucket next time, which is the price of a memory bound under a flood of distinct keys.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self.max_keys = max_keys
        # key -> [tokens, monotonic time they were counted]; OrderedDict for O(1) LRU order.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    async def hit(self, key: str, limit: Limit, cost: float = 1.0) -> Decision:
        _check_cost(limit, cost)
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [float(limit.burst), now]
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.rate_per_s)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return Decision(allowed=True, remaining=int(bucket[0]), retry_after_s=0.0, limit=limit)
        retry_after = (cost - bucket[0]) / limit.rate_per_s
        return Decision(allowed=False, remaining=int(bucket[0]), retry_after_s=retry_after, limit=limit)

    async def close(self) -> None:
        self._buckets.clear()


# One round trip, atomic: Redis runs a script to the end before any other command. The clock is the server's, so
# replicas whose clocks disagree still agree on every bucket. Numbers passed to redis.call keep full precision (Redis
# formats them with 17 digits); the returned floats go back as strings because Redis truncates Lua numbers to integers.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local margin_ms = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
else
  -- max(0, ...): after a failover the new primary's clock may be behind the old one's.
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
end
local allowed = 0
local retry_after = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry_after = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
-- Once full, the bucket is the same as no bucket: let it go then, plus a margin.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + margin_ms)
return {allowed, tostring(tokens), tostring(retry_after)}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every gateway replica: one Lua script per hit, on the Redis server's clock.

    **Fails open.** When Redis fails (unreachable, too slow, read-only after a failover, out of memory, or not Redis
    at all), the hit is allowed and a warning naming the error is logged at most once per 30 s. The limiter protects
    the backends from abuse; turning a Redis outage into a full API outage would do more harm than a short while
    without limits. After a failure Redis is left alone for ``recheck_s``, so an unreachable server costs requests no
    latency beyond the first timeout.

    Idle buckets expire on their own: each write sets a TTL of the time to refill fully plus one second.
    """

    WARN_EVERY_S = 30.0
    TTL_MARGIN_MS = 1000

    def __init__(
        self, url: str, prefix: str = "strata:rl:", *, timeout_s: float = 0.25, recheck_s: float = 1.0
    ) -> None:
        self.prefix = prefix
        self.recheck_s = recheck_s
        # Short timeouts: a hit sits in front of every request. One immediate retry on a connection error covers a
        # pooled connection the server has closed; a timeout is not retried, as the script may have run already.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._script = self._redis.register_script(_BUCKET_SCRIPT)
        self._down_until = -math.inf
        self._last_warning = -math.inf

    async def hit(self, key: str, limit: Limit, cost: float = 1.0) -> Decision:
        _check_cost(limit, cost)
        if time.monotonic() < self._down_until:
            return self._fail_open(limit)
        try:
            allowed, tokens, retry_after = await self._script(
                keys=[self.prefix + key], args=[limit.rate_per_s, limit.burst, cost, self.TTL_MARGIN_MS]
            )
        except RedisError as exc:
            now = time.monotonic()
            self._down_until = now + self.recheck_s
            if now - self._last_warning >= self.WARN_EVERY_S:
                self._last_warning = now
                log.warning("rate limiting is off: Redis is not usable (%s: %s)", type(exc).__name__, exc)
            return self._fail_open(limit)
        return Decision(
            allowed=allowed == 1,
            remaining=int(float(tokens)),
            retry_after_s=float(retry_after),
            limit=limit,
        )

    @staticmethod
    def _fail_open(limit: Limit) -> Decision:
        return Decision(allowed=True, remaining=limit.burst, retry_after_s=0.0, limit=limit)

    async def close(self) -> None:
        await self._redis.aclose()


def create_rate_limiter(redis_url: str | None) -> RateLimiter:
    """Redis when a URL is configured (several replicas share limits), else this process's memory."""
    if redis_url:
        return RedisRateLimiter(redis_url)
    return MemoryRateLimiter()
