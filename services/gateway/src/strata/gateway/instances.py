"""What is running: every service instance's lifecycle events (started, heartbeat, stopped) kept in memory.

Each gateway replica has a consumer of its own that starts from the last minute of events, so a new replica knows the
live instances within one heartbeat, and the server removes the consumer once the replica is gone.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from typing import Any

from strata.common.consumer import ConsumerSpec, Delivery
from strata.common.contracts.system import InstanceInfo
from strata.common.db import utcnow
from strata.common.events import SERVICES, CloudEvent

log = logging.getLogger(__name__)


def consumer_spec(instance_id: str) -> ConsumerSpec:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", instance_id)[:80]
    return ConsumerSpec(
        name=f"gateway-instances-{safe}",
        subjects=tuple(f"strata.{service}.instance.>" for service in SERVICES),
        max_deliver=3,
        backoff_s=(1.0, 2.0),
        deliver_since_s=60.0,
        inactive_threshold_s=300.0,
        description="Service instance lifecycle, for the gateway's view of what is running",
    )


class InstanceRegistry:
    def __init__(self, *, stale_after_s: float) -> None:
        self.stale_after = timedelta(seconds=stale_after_s)
        self._instances: dict[tuple[str, str], dict[str, Any]] = {}

    async def handle(self, event: CloudEvent, delivery: Delivery) -> None:
        info = event.payload(InstanceInfo)
        key = (info.service, info.instance_id)
        verb = event.type.rsplit(".", 1)[-1]
        if verb == "stopped":
            self._instances.pop(key, None)
            log.info("instance %s of %s stopped (event %s)", info.instance_id, info.service, event.id)
            return
        known = key in self._instances
        record = self._instances.setdefault(key, {"first_seen": event.time})
        if verb == "started":
            log.info("instance %s of %s started (event %s)", info.instance_id, info.service, event.id)
        elif not known:
            log.info("instance %s of %s is alive (event %s)", info.instance_id, info.service, event.id)
        if event.time < record.get("last_seen", event.time):
            return  # an older event replayed after a newer one
        record.update(info.model_dump(mode="json"), last_seen=event.time)

    def list(self, now: datetime | None = None) -> list[dict[str, Any]]:
        now = now or utcnow()
        out = []
        for record in self._instances.values():
            last_seen: datetime = record["last_seen"]
            out.append(
                {
                    **{k: v for k, v in record.items() if k not in ("first_seen", "last_seen")},
                    "last_seen": last_seen.isoformat(),
                    "status": "live" if now - last_seen <= self.stale_after else "stale",
                }
            )
        return sorted(out, key=lambda r: (r["service"], r["instance_id"]))
