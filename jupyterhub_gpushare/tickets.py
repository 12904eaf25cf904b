"""The queue's wire format: what a spawn sends to join the line, and what it is told.

One module, used by both sides: the spawner's client builds a
:class:`TicketRequest` and reads :class:`TicketStatus`; the service parses the
request (every problem a :class:`TicketError`, which the handlers turn into a
400) and sends statuses. Pure data, no I/O.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .capacity import PoolSpec

# The hub's spawners authenticate to the service with this header.
HUB_SECRET_HEADER = "X-Gpushare-Hub-Secret"

# Ticket states, as the service reports them.
WAITING = "waiting"  # in line
ADMITTED = "admitted"  # slices booked on a node; the spawn may create its pod
HELD = "held"  # its spawn went away (hub restart): the place is kept for a while
GONE = "gone"  # not (or no longer) in the line

TICKET_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_SLICES = 1024
# JupyterHub itself puts no length limit on names; this only bounds memory.
MAX_NAME = 4096
MAX_SELECTOR_LABELS = 32
# Kubernetes: a label key is an optional 253-character prefix, '/', and 63 characters.
MAX_LABEL_KEY = 317
MAX_LABEL_VALUE = 63


class TicketError(ValueError):
    """A request that does not describe a spawn; the message says what is wrong."""


@dataclass(frozen=True)
class TicketRequest:
    """A spawn asking for slices: who, how many, where, and since when."""

    id: str
    user: str
    server: str
    slices: int
    pool: PoolSpec
    requested_at: float
    # re-joining with slices it was already given (its pod was rejected by the node)
    admitted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "server": self.server,
            "slices": self.slices,
            "pool": {"resource": self.pool.resource, "selector": dict(self.pool.selector)},
            "requested_at": self.requested_at,
            "admitted": self.admitted,
        }

    @classmethod
    def from_json(cls, body: object, resources: list[str] | tuple[str, ...]) -> TicketRequest:
        """Validate a request body; ``resources`` are the GPU resources the service counts."""
        if not isinstance(body, Mapping):
            raise TicketError("the request body must be a JSON object")
        ticket_id = _field(body, "id", str)
        if not TICKET_ID.match(ticket_id):
            raise TicketError("field 'id' must be 1-128 letters, digits, '.', '_' or '-'")
        user = _field(body, "user", str)
        server = _field(body, "server", str, required=False) or ""
        if not user or len(user) > MAX_NAME or len(server) > MAX_NAME:
            raise TicketError(f"fields 'user' and 'server' must be 1-{MAX_NAME} characters")
        slices = _field(body, "slices", int)
        if not 1 <= slices <= MAX_SLICES:
            raise TicketError(f"field 'slices' must be between 1 and {MAX_SLICES}")
        requested_at = _field(body, "requested_at", (int, float))
        if not math.isfinite(requested_at) or not 0 <= requested_at <= time.time() + 300:
            raise TicketError("field 'requested_at' must be a Unix time, not in the future")
        pool = _field(body, "pool", dict)
        resource = pool.get("resource")
        if resource not in resources:
            raise TicketError(
                f"unknown pool: resource {resource!r} is not one of {list(resources)}"
            )
        selector = pool.get("selector") or {}
        if (
            not isinstance(selector, dict)
            or len(selector) > MAX_SELECTOR_LABELS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items())
            or any(len(k) > MAX_LABEL_KEY or len(v) > MAX_LABEL_VALUE for k, v in selector.items())
        ):
            raise TicketError("field 'pool.selector' must map label names to label values")
        admitted = _field(body, "admitted", bool, required=False) or False
        return cls(
            id=ticket_id,
            user=user,
            server=server,
            slices=slices,
            pool=PoolSpec.from_selector(resource, selector),
            requested_at=float(requested_at),
            admitted=admitted,
        )


def _field(body: Mapping, name: str, kind: type | tuple[type, ...], required: bool = True):
    if name not in body:
        if required:
            raise TicketError(f"missing field {name!r}")
        return None
    value = body[name]
    # JSON true/false are Python bools, which are also ints
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise TicketError(f"field {name!r} has the wrong type")
    return value


@dataclass(slots=True)
class TicketStatus:
    """Where a spawn stands, as the service tells the hub (and, trimmed, the user).

    ``position`` counts the waiting spawns that could use the same slices and
    asked earlier, whatever their line; ``waiting`` is how many such spawns
    there are in all. ``pool`` is the pool's public summary (slice counts that
    exclude booked slices). ``reason`` says why a spawn at the head still waits.
    ``eta_at`` and ``eta_bound_at`` are absolute times, so that a status does not
    change (and is not sent again) merely because time passes.
    """

    ticket: str
    state: str
    ready: bool = True
    position: int = 0
    waiting: int = 0
    pool: dict[str, Any] = field(default_factory=dict)
    # when the spawn should get its slices, and when at the latest (Unix times;
    # eta_bound_at only where something guarantees it)
    eta_at: float | None = None
    eta_bound_at: float | None = None
    requested_at: float | None = None
    node: str | None = None
    reason: str | None = None
    kept_place: bool = False
    held_until: float | None = None
    problem: str | None = None
    gone_reason: str | None = None

    # what a user may see of their own ticket: no node names, no cluster internals
    PUBLIC = (
        "ticket",
        "state",
        "position",
        "waiting",
        "pool",
        "eta_at",
        "eta_bound_at",
        "reason",
        "kept_place",
        "held_until",
    )

    def to_json(self) -> dict[str, Any]:
        # not dataclasses.asdict, which deep-copies: statuses are built by the hundred
        return {
            name: value for name in _STATUS_FIELDS if (value := getattr(self, name)) is not None
        }

    def public(self) -> dict[str, Any]:
        data = self.to_json()
        return {k: data[k] for k in self.PUBLIC if k in data}

    @classmethod
    def gone(cls, ticket: str, reason: str | None = None) -> TicketStatus:
        return cls(ticket=ticket, state=GONE, gone_reason=reason)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TicketStatus:
        """Read a status the service sent; unknown keys (a newer service) are ignored."""
        known = set(_STATUS_FIELDS)
        if not isinstance(data.get("ticket"), str) or not isinstance(data.get("state"), str):
            raise TicketError("a ticket status needs 'ticket' and 'state'")
        return cls(**{k: v for k, v in data.items() if k in known})


_STATUS_FIELDS = tuple(TicketStatus.__dataclass_fields__)
