"""Tunnel authentication: the device key signs the relay's challenge.

The signed message names the relay's TLS certificate as this end saw it, so a
signature captured on one connection is worthless on another relay or behind
an interceptor. The relay verifies with ``verify_challenge_signature``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from shared.protocol import auth_message


def peer_certificate_digest(ssl_object: Any) -> bytes:
    """SHA-256 of the DER certificate the TLS peer presented."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ValueError("the TLS connection carries no peer certificate")
    return hashlib.sha256(der).digest()


def certificate_digest(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def sign_challenge(sign: Callable[[bytes], bytes], nonce: bytes, relay_cert_sha256: bytes) -> bytes:
    """Sign the challenge with ``sign`` (a KeyStore's ``sign``)."""
    return sign(auth_message(nonce, relay_cert_sha256))


def verify_challenge_signature(
    public_key: ec.EllipticCurvePublicKey, signature: bytes, nonce: bytes, relay_cert_sha256: bytes
) -> bool:
    """True when ``signature`` is the key's signature over this relay's challenge."""
    try:
        public_key.verify(signature, auth_message(nonce, relay_cert_sha256), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
