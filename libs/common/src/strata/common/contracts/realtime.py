"""The WebSocket's contract with the services: where live events come from, and who may read a channel.

- The ``STRATA_EVENTS`` stream republishes every stored event on ``live.<subject>`` (a core NATS subject in no stream)
  with its stream sequence in the ``Nats-Sequence`` header, so a gateway replica subscribes to exactly the subjects its
  own sockets need and still knows each event's ``seq``.
- ``rpc.execution.can_read_job`` and ``rpc.datasets.can_read`` answer whether a user may read one job or dataset (the
  ``job:<id>`` and ``dataset:<id>`` channels); ``rpc.datasets.shared_with`` lists the datasets shared with a user (the
  ``user`` channel follows them too).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..events import LIVE_PREFIX
from .auth import Role

__all__ = [
    "ACCESS_COOKIE",
    "LIVE_PREFIX",
    "WS_PATH",
    "ReadCheck",
    "ReadVerdict",
    "SharedWith",
    "SharedWithRequest",
    "live_subject",
]

#: The access token as an HttpOnly cookie, sent by browsers only to the WebSocket path.
ACCESS_COOKIE = "strata_access"
WS_PATH = "/api/v1/ws"


def live_subject(subject_filter: str) -> str:
    return f"{LIVE_PREFIX}.{subject_filter}"


class ReadCheck(BaseModel):
    """May ``user_id`` (with ``role``) read the job or dataset ``resource_id``?"""

    user_id: str = Field(max_length=64)
    role: Role
    resource_id: str = Field(min_length=1, max_length=64)


class ReadVerdict(BaseModel):
    readable: bool
    owner_id: str | None = None  # only when readable


class SharedWithRequest(BaseModel):
    user_id: str = Field(max_length=64)
    role: Role
    limit: int = Field(default=1000, ge=1, le=10_000)


class SharedWith(BaseModel):
    """Datasets readable by the user through a share (to them or to a role they hold), not their own."""

    dataset_ids: list[str]
    truncated: bool = False
