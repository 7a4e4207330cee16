"""HTTP/1.1 on a connected (TLS) socket: one request, its answer read whole and bounded.

The agent's requests are a few small JSON exchanges with its own controller
a day (agent/identity/https.py). ``http.client`` would do, but it brings the
email package's parser with it (half a MiB that an idle gateway would keep
for the whole life of the process); the part of HTTP/1.1 a client needs to
read an answer is this: a status line, header lines, and a body framed by
``Content-Length``, by chunks, or by the end of the connection.

Everything read is bounded: the head by ``MAX_HEAD``, the body by the
caller's limit (an EnrollmentError naming the URL, as a wrong address would
give). An answer that is not HTTP, or ends before it is whole, is a
ConnectionError saying so: the network's kind of failure.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from agent.errors import EnrollmentError

#: Status line and headers together; an answer from the controller (or a
#: reverse proxy before it) has a few hundred bytes of them, 16 KiB is no HTTP peer's.
MAX_HEAD = 16 * 1024
#: A chunk-size line is a hexadecimal number and perhaps an extension.
MAX_CHUNK_LINE = 1024
HEX_DIGITS = b"0123456789abcdefABCDEF"
#: One TLS record's worth of plaintext per read.
READ_SIZE = 16 * 1024
#: Answers whose status says there is no body, whatever the headers claim (RFC 9112, 6.3).
NO_BODY = frozenset({204, 304})
#: An informational answer (100 Continue and the like) comes before the real one.
INFORMATIONAL = range(100, 200)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def not_http(why: str) -> ConnectionError:
    return ConnectionError(f"the answer was not HTTP ({why})")


def too_large(url: str, limit: int) -> EnrollmentError:
    return EnrollmentError(f"the answer from {url} is larger than {limit} bytes; check the address in the token")


class Connection:
    """Requests in a row on ``sock``; after an answer that ends the connection, it is closed and refuses more."""

    def __init__(self, sock: socket.socket, host_header: str) -> None:
        self.sock: socket.socket | None = sock
        self.host_header = host_header
        self._buffer = bytearray()

    def exchange(self, method: str, target: str, url: str, limit: int, payload: bytes | None = None) -> Answer:
        """Send one request and read its answer (body at most ``limit`` bytes)."""
        if self.sock is None:
            raise ConnectionError("the connection was closed after the last answer")
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}", "Accept-Encoding: identity",
                "Accept: application/json"]
        if payload is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        elif method in ("POST", "PUT"):
            head.append("Content-Length: 0")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (payload or b""))
        while True:
            version, status, headers = self._read_head()
            if status not in INFORMATIONAL:
                break
        body, reusable = self._read_body(method, status, headers, url, limit)
        options = {token.strip() for token in headers.get("connection", "").lower().split(",")}
        # HTTP/1.0 closes after each answer unless it says otherwise; 1.1 keeps the connection unless it says so.
        if not reusable or "close" in options or (version == b"HTTP/1.0" and "keep-alive" not in options):
            self.close()
        return Answer(status, body)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(READ_SIZE)
        if not data:
            raise not_http("the connection closed before the answer was whole")
        self._buffer += data

    def _line(self, bound: int, what: str) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                if end >= bound:
                    raise not_http(f"{what} too long")
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[:end + 1]
                return line
            if len(self._buffer) >= bound:
                raise not_http(f"{what} too long")
            self._fill()

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _read_head(self) -> tuple[bytes, int, dict[str, str]]:
        left = MAX_HEAD
        words = self._line(left, "the status line").split(None, 2)
        left -= sum(map(len, words)) + 2
        if len(words) < 2 or not words[0].startswith(b"HTTP/1.") or len(words[1]) != 3 or not words[1].isdigit():
            raise not_http("no status line")
        headers: dict[str, str] = {}
        while True:
            line = self._line(left, "the header")
            left -= len(line) + 2
            if not line:
                return words[0], int(words[1]), headers
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise not_http("a malformed header")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value

    def _read_body(self, method: str, status: int, headers: dict[str, str], url: str,
                   limit: int) -> tuple[bytes, bool]:
        """The body and whether the connection may carry another request."""
        if method == "HEAD" or status in NO_BODY:
            return b"", True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunks(url, limit), True
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise not_http("a malformed Content-Length")
            if int(length) > limit:
                raise too_large(url, limit)
            return self._take(int(length)), True
        return self._read_to_close(url, limit), False

    def _read_chunks(self, url: str, limit: int) -> bytes:
        body = bytearray()
        while True:
            size_text = self._line(MAX_CHUNK_LINE, "a chunk size").split(b";", 1)[0].strip()
            if not size_text or size_text.strip(HEX_DIGITS):
                raise not_http("a malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise too_large(url, limit)
            body += self._take(size)
            if self._line(MAX_CHUNK_LINE, "a chunk's end"):
                raise not_http("a chunk longer than its size")
        left = MAX_HEAD
        while line := self._line(left, "the trailer"):  # trailers are read and not used
            left -= len(line) + 2
        return bytes(body)

    def _read_to_close(self, url: str, limit: int) -> bytes:
        assert self.sock is not None
        while len(self._buffer) <= limit:
            data = self.sock.recv(READ_SIZE)
            if not data:
                body = bytes(self._buffer)
                self._buffer.clear()
                return body
            self._buffer += data
        raise too_large(url, limit)
