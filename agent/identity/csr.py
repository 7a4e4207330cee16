"""The certificate signing request sent on enrollment, signed inside the key store."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from agent.identity.keystore import KeyStore


def build_csr(keystore: KeyStore, name: str) -> x509.CertificateSigningRequest:
    """A CSR for identity ``name`` over the key store's public key.

    The subject is only a hint: the controller decides the certificate's
    names (the SPIFFE URI) from the token, never from the CSR.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    return builder.sign(keystore.signing_key(), hashes.SHA256())
