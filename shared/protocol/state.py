"""Which end a connection is, and how far its authentication got."""

from __future__ import annotations

import enum


class Role(enum.Enum):
    AGENT = "agent"
    RELAY = "relay"


class Handshake(enum.Enum):
    """Where authentication stands; the relay and the agent walk different halves."""

    START = "start"
    #: relay: CHALLENGE sent; agent: CHALLENGE received
    CHALLENGED = "challenged"
    #: relay: AUTH received, not yet answered; agent: AUTH sent
    AUTH_EXCHANGED = "auth exchanged"
    DONE = "done"
