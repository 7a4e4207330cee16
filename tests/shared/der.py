"""DER pieces for tests that build certificates by hand: a CA's signature over bytes it would never sign."""

from __future__ import annotations

#: AlgorithmIdentifier ecdsa-with-SHA256 (no parameters), as the CA signs.
ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def der_item(tag: int, content: bytes) -> bytes:
    """One DER element: its tag, its length (short or long form), its content."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    width = (size.bit_length() + 7) // 8
    return bytes([tag, 0x80 | width]) + size.to_bytes(width, "big") + content


def certificate_der(tbs: bytes, signature: bytes) -> bytes:
    """A certificate of ``tbs`` (a TBSCertificate's DER) with an ECDSA-SHA256 ``signature`` beside it."""
    return der_item(0x30, tbs + ECDSA_WITH_SHA256 + der_item(0x03, b"\0" + signature))
