"""A tiny NTP server on 127.0.0.1 that answers with a chosen clock offset.

Speaks enough of RFC 5905 for any client: a 48-byte server packet (mode 4)
with the client's transmit time as origin, and receive/transmit times from
the real clock plus ``offset``. ``stratum``, ``leap``, ``silent`` and
``foreign_origin`` make it misbehave the ways real servers do.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

#: Seconds from the NTP era (1900) to the unix epoch.
NTP_EPOCH_OFFSET = 2208988800
#: No test sends more; the thread stops answering after this many.
MAX_ANSWERS = 1000


def _ntp_timestamp(unix: float) -> bytes:
    value = unix + NTP_EPOCH_OFFSET
    seconds = int(value)
    fraction = int((value - seconds) * 2**32) & 0xFFFFFFFF
    return struct.pack("!II", seconds & 0xFFFFFFFF, fraction)


class NtpResponder:
    """Answers on ``self.address`` ("127.0.0.1:port") until ``close()``."""

    def __init__(self, offset: float = 0.0, stratum: int = 2, leap: int = 0, silent: bool = False,
                 foreign_origin: bool = False) -> None:
        self.offset = offset
        self.stratum = stratum
        self.leap = leap
        self.silent = silent
        self.foreign_origin = foreign_origin
        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set() and self.requests < MAX_ANSWERS:
            try:
                packet, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            received = time.time() + self.offset
            if len(packet) < 48:
                continue
            self.requests += 1
            if self.silent:
                continue
            version = (packet[0] >> 3) & 0x7
            origin = packet[40:48] if not self.foreign_origin else _ntp_timestamp(time.time() - 3600)
            header = bytes([(self.leap << 6) | (version << 3) | 4, self.stratum, packet[2], 0xEC])
            answer = (header + struct.pack("!II", 0, 0) + b"LOCL" + _ntp_timestamp(received) + origin
                      + _ntp_timestamp(received) + _ntp_timestamp(time.time() + self.offset))
            try:
                self.sock.sendto(answer, peer)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self.sock.close()

    def __enter__(self) -> NtpResponder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def silent_port() -> str:
    """A loopback UDP address where nobody answers (NTP blocked, as on some APNs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"
