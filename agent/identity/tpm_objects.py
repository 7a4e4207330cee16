"""TPM object templates and conversions to and from cryptography's types.

Written against the tpm2-pytss API common to Debian 12's 1.2 and PyPI's 3.0:
types are built field by field (no template-string parser differences), and
``marshal``/``unmarshal`` are the TSS's own MU functions in both.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, utils

from agent.identity.tss import (
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RH,
    TPM2_ST,
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SIGNATURE,
    TPMT_TK_HASHCHECK,
)

#: Name recorded in key.tpm.json for the parent template below.
SRK_TEMPLATE_NAME = "tcg-srk-ecc-p256"
#: The TCG provisioning guidance's ECC storage root key: restricted decrypt,
#: AES-128-CFB, NIST P-256, zero-filled unique. Any TPM derives the same key
#: from it for as long as the owner seed lives, so nothing has to be persisted.
SRK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)
#: The device key: born in the TPM, never duplicable, no PCR policy (a firmware
#: update must not lose the identity), exempt from dictionary-attack lockout.
DEVICE_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
)
#: Bytes in a P-256 coordinate.
P256_COORDINATE_BYTES = 32
#: The persistent handle the TCG reserves for the owner's storage root key.
PERSISTENT_SRK_HANDLE = 0x81000001


def srk_template() -> TPM2B_PUBLIC:
    """The public template of the standard ECC P-256 storage root key."""
    template = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=SRK_ATTRIBUTES)
    )
    detail = template.publicArea.parameters.eccDetail
    detail.symmetric.algorithm = TPM2_ALG.AES
    detail.symmetric.keyBits.aes = 128
    detail.symmetric.mode.aes = TPM2_ALG.CFB
    detail.scheme.scheme = TPM2_ALG.NULL
    detail.curveID = TPM2_ECC.NIST_P256
    detail.kdf.scheme = TPM2_ALG.NULL
    template.publicArea.unique.ecc.x = b"\0" * P256_COORDINATE_BYTES
    template.publicArea.unique.ecc.y = b"\0" * P256_COORDINATE_BYTES
    return template


def device_key_template() -> TPM2B_PUBLIC:
    """The public template of the device key: ECC P-256, ECDSA-SHA256 only."""
    template = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=DEVICE_KEY_ATTRIBUTES)
    )
    detail = template.publicArea.parameters.eccDetail
    detail.symmetric.algorithm = TPM2_ALG.NULL
    detail.scheme.scheme = TPM2_ALG.ECDSA
    detail.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    detail.curveID = TPM2_ECC.NIST_P256
    detail.kdf.scheme = TPM2_ALG.NULL
    return template


def is_storage_parent(public: TPM2B_PUBLIC) -> bool:
    """True for a restricted decryption key, the only kind that can parent our key."""
    attributes = int(public.publicArea.objectAttributes)
    wanted = int(TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
    return attributes & wanted == wanted and not attributes & int(TPMA_OBJECT.SIGN_ENCRYPT)


def is_device_key(public: TPM2B_PUBLIC) -> bool:
    """True when ``public`` describes a key made from ``device_key_template``."""
    area = public.publicArea
    detail = area.parameters.eccDetail
    return (
        int(area.type) == TPM2_ALG.ECC
        and int(area.nameAlg) == TPM2_ALG.SHA256
        and int(area.objectAttributes) == int(DEVICE_KEY_ATTRIBUTES)
        and int(detail.curveID) == TPM2_ECC.NIST_P256
        and int(detail.scheme.scheme) == TPM2_ALG.ECDSA
        and int(detail.scheme.details.ecdsa.hashAlg) == TPM2_ALG.SHA256
        and len(bytes(area.unique.ecc.x)) == P256_COORDINATE_BYTES
        and len(bytes(area.unique.ecc.y)) == P256_COORDINATE_BYTES
    )


def name_of(public: TPM2B_PUBLIC) -> bytes:
    """The TPM name of an object (nameAlg || digest of its public area)."""
    return bytes(public.get_name().marshal())


def to_public_key(public: TPM2B_PUBLIC) -> ec.EllipticCurvePublicKey:
    """The cryptography public key of an ECC P-256 public area (ValueError if not on the curve)."""
    point = public.publicArea.unique.ecc
    x = int.from_bytes(bytes(point.x), "big")
    y = int.from_bytes(bytes(point.y), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def ecdsa_sha256_scheme() -> TPMT_SIG_SCHEME:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return scheme


def null_hashcheck() -> TPMT_TK_HASHCHECK:
    """The "digest not made by the TPM" ticket; allowed because the key is unrestricted.

    Passed explicitly: pytss 1.2 has no default for it, 3.0 does.
    """
    return TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)


def digest(value: bytes) -> TPM2B_DIGEST:
    return TPM2B_DIGEST(value)


def to_der_signature(signature: TPMT_SIGNATURE) -> bytes:
    """The DER ``ECDSA-Sig-Value`` (r, s) of a TPM ECDSA signature."""
    if int(signature.sigAlg) != TPM2_ALG.ECDSA:
        raise ValueError("the TPM returned a signature that is not ECDSA")
    r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
    return utils.encode_dss_signature(r, s)


def unmarshal_public(blob: bytes) -> TPM2B_PUBLIC:
    """A TPM2B_PUBLIC from exactly ``blob`` (ValueError on junk or trailing bytes)."""
    return _unmarshal_exact(TPM2B_PUBLIC, blob)


def unmarshal_private(blob: bytes) -> TPM2B_PRIVATE:
    """A TPM2B_PRIVATE from exactly ``blob`` (ValueError on junk or trailing bytes)."""
    return _unmarshal_exact(TPM2B_PRIVATE, blob)


def _unmarshal_exact(kind: Any, blob: bytes) -> Any:
    try:
        value, used = kind.unmarshal(blob)
    except Exception as error:  # the MU layer raises TSS2_Exception on malformed input
        raise ValueError(f"not a {kind.__name__}: {error}") from None
    if used != len(blob):
        raise ValueError(f"not a {kind.__name__}: {len(blob) - used} trailing bytes")
    return value
