"""Events every service publishes about its own instances, so operators (and the gateway) see what is running."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from pydantic import AwareDatetime

from ..events import EventPayload


class InstanceInfo(EventPayload):
    service: str
    instance_id: str
    version: str
    host: str
    pid: int
    started_at: AwareDatetime


class InstanceStarted(InstanceInfo):
    """``strata.<service>.instance.started``: published through the outbox when an instance has started."""

    event_type: ClassVar[str] = "strata.{service}.instance.started"


class InstanceHeartbeat(InstanceInfo):
    """``strata.<service>.instance.heartbeat``: sent every few seconds while the instance lives (no outbox)."""

    event_type: ClassVar[str] = "strata.{service}.instance.heartbeat"
    ready: bool = True


class InstanceStopped(InstanceInfo):
    """``strata.<service>.instance.stopped``: published on a graceful shutdown."""

    event_type: ClassVar[str] = "strata.{service}.instance.stopped"
    stopped_at: datetime | None = None


def instance_subject(kind: type[InstanceInfo], service: str) -> str:
    return kind.event_type.format(service=service)
