"""Two protocol ends wired back to back, and a frame reader independent of the one under test.

A module with its own name, not conftest.py: test folders here have no
__init__.py, so ``import conftest`` could pick up another folder's conftest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from shared.protocol import Connection, ConnectionSnapshot, Liveness, ProtocolLimits, Role

NONCE = bytes(range(32))
RELAY_CERT_SHA256 = bytes(32 * [0xAB])
CHAIN = ["-----BEGIN CERTIFICATE-----\nleaf\n-----END CERTIFICATE-----\n"]
SIGNATURE = b"\x30\x45signature-bytes"
RELAY_INFO = {"identity": "spiffe://example.org/acme/gw-1", "name": "gw-1", "time": 1700000000}
# A bound on every pumping loop: a handful of round trips settles any exchange here.
MAX_PUMP_ROUNDS = 100


def read_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every whole frame in ``data``."""
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 10, "trailing partial frame header"
        frame_type, flags, stream_id, length = struct.unpack_from(">BBII", data, pos)
        payload = data[pos + 10:pos + 10 + length]
        assert len(payload) == length, "trailing partial frame payload"
        frames.append((frame_type, flags, stream_id, payload))
        pos += 10 + length
    return frames


def raw_frame(frame_type: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A frame built by hand, to send what a correct Connection never would."""
    return struct.pack(">BBII", frame_type, flags, stream_id, len(payload)) + payload


@dataclass
class Pair:
    """A relay and an agent Connection exchanging bytes through ``pump``."""

    relay: Connection
    agent: Connection
    now: float = 0.0
    relay_events: list = field(default_factory=list)
    agent_events: list = field(default_factory=list)

    def pump(self) -> tuple[list, list]:
        """Deliver queued bytes both ways until none are left; returns (relay events, agent events)."""
        relay_events: list = []
        agent_events: list = []
        for _ in range(MAX_PUMP_ROUNDS):
            to_agent = self.relay.data_to_send()
            to_relay = self.agent.data_to_send()
            if not to_agent and not to_relay:
                break
            if to_agent:
                agent_events += self.agent.receive_data(to_agent, self.now)
            if to_relay:
                relay_events += self.relay.receive_data(to_relay, self.now)
        else:
            raise AssertionError("the two ends never went quiet")
        self.relay_events += relay_events
        self.agent_events += agent_events
        return relay_events, agent_events


def make_pair(now: float = 0.0, *, relay_limits: ProtocolLimits = ProtocolLimits(),
              agent_limits: ProtocolLimits = ProtocolLimits(), relay_liveness: Liveness = Liveness(None),
              agent_liveness: Liveness = Liveness(), authenticate: bool = True) -> Pair:
    pair = Pair(Connection(Role.RELAY, now, limits=relay_limits, liveness=relay_liveness),
                Connection(Role.AGENT, now, limits=agent_limits, liveness=agent_liveness), now)
    if authenticate:
        pair.relay.send_challenge(NONCE)
        pair.pump()
        pair.agent.send_auth(CHAIN, SIGNATURE)
        pair.pump()
        pair.relay.accept_auth(dict(RELAY_INFO))
        pair.pump()
        assert pair.relay.authenticated and pair.agent.authenticated
        pair.relay_events.clear()
        pair.agent_events.clear()
    return pair


def snapshot(conn: Connection) -> ConnectionSnapshot:
    """Everything a failed call must leave as it was."""
    return conn.snapshot()


def stream_still_works(pair: Pair) -> None:
    """A stream opened after whatever the test did still carries data: the tunnel lives."""
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"still here")
    relay_events, _ = pair.pump()
    assert not pair.relay.closed and not pair.agent.closed
    assert any(getattr(e, "data", None) == b"still here" for e in relay_events)
