"""REPORT: the agent's report of itself (version, link, round trip, clock, key, certificate), sent and received.

The agent sends one when the tunnel comes up and when something in it
changes meaningfully (its glue decides when); the relay keeps the last one.
A report the relay cannot use (too large, malformed) is refused alone, as a
``ReportReceived`` with ``refused`` set: it never ends the tunnel, so a bad
report costs its sender the report and nothing else.
"""

from __future__ import annotations

from typing import Any

from shared.protocol.control import MAX_REPORT_BYTES, decode_report
from shared.protocol.endpoint import Endpoint, require
from shared.protocol.errors import ErrorCode, RemoteProtocolError
from shared.protocol.events import Event, ReportReceived
from shared.protocol.frames import FrameType
from shared.protocol.state import Role


class Reports:
    """The REPORT frames of one tunnel end."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        #: REPORT frames sent (agent) or received (relay), refused ones included
        self.count = 0

    def send(self, report: dict[str, Any]) -> int:
        """Agent: queue REPORT; returns its payload size. Refuses one the relay would refuse for its size."""
        endpoint = self._endpoint
        require(endpoint.role is Role.AGENT, "only the agent sends REPORT")
        endpoint.require_ready()
        payload = endpoint.control_payload("REPORT", report)
        require(len(payload) <= MAX_REPORT_BYTES,
                f"REPORT payload of {len(payload)} bytes exceeds {MAX_REPORT_BYTES}")
        endpoint.queue_frame(FrameType.REPORT, 0, 0, payload)
        self.count += 1
        return len(payload)

    def on_report(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._endpoint.role is not Role.RELAY:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected REPORT (only an agent sends one)")
        self.count += 1
        try:
            report = decode_report(payload)
        except RemoteProtocolError as exc:
            events.append(ReportReceived(None, str(exc), len(payload)))
            return
        events.append(ReportReceived(report, None, len(payload)))
