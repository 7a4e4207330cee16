"""The data directory: created complete on first start, reused on every later one.

A first start builds everything in a hidden sibling directory and renames it
into place, so a failure (disk full, killed) never leaves a half-made data
directory behind.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import shutil
import socket
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent.fsutil import atomic_write, ensure_private_dir, fsync_directory
from controller.audit import AuditLog
from controller.ca import CertificateAuthority, ensure_server_certificate
from controller.context import ControllerContext
from controller.enrollment import Enrollment
from controller.errors import StartupError
from controller.policy import PolicyEngine
from controller.registry import Registry
from controller.renewal import Renewal
from controller.settings import WILDCARD_HOSTS, Settings
from controller.store import Store
from controller.tokens import TokenAuthority

#: The management credential: 32 random bytes, urlsafe base64.
ADMIN_TOKEN_BYTES = 32
#: The identity `outpostctl connect` acts as; it can dial nothing until a policy allows it.
OPERATOR_NAME = "operator"
OPERATOR_ROLE = "operator"
OPERATOR_TENANT = "default"


def server_names(settings: Settings) -> list[str]:
    """Every name the listener's certificate must cover."""
    names = ["localhost", socket.gethostname(), "127.0.0.1", "::1"]
    if settings.listen_host not in WILDCARD_HOSTS:
        names.append(settings.listen_host)
    names.extend(settings.extra_sans)
    advertised = _url_host(settings.base_url)
    if advertised:
        names.append(advertised)
    unique: list[str] = []
    for name in names:
        if name and name.lower() not in unique:
            unique.append(name.lower())
    return unique


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def outpostctl_config(settings: Settings, admin_token: str) -> bytes:
    """The TOML `outpostctl` reads: where the controller is, its CA and the credential."""
    ca_path = str(settings.ca_cert_path.resolve())

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "# Written by outpost-controller; the token is the management credential, keep this file private.",
        f"url = {quoted(settings.base_url)}",
        f"ca = {quoted(ca_path)}",
        f"token = {quoted(admin_token)}",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _is_fresh(data_dir: Path) -> bool:
    return not data_dir.exists() or (data_dir.is_dir() and not any(data_dir.iterdir()))


def _create(settings: Settings) -> None:
    """Build a complete data directory in a staging sibling, then rename it into place."""
    final = settings.data_dir
    parent = final.parent
    if not parent.is_dir():
        raise StartupError(f"The parent of the data directory {final} does not exist; create it or choose another --data.")
    staging = parent / f".{final.name}.{secrets.token_hex(4)}.creating"
    try:
        staging.mkdir(mode=0o700)
    except OSError as error:
        raise StartupError(
            f"Cannot create the data directory {final}: {error.strerror}; choose a writable --data."
        ) from None
    try:
        staged = dataclasses.replace(settings, data_dir=staging)
        ca = CertificateAuthority.create(settings.trust_domain)
        ca.save(staged.ca_cert_path, staged.ca_key_path)
        admin_token = secrets.token_urlsafe(ADMIN_TOKEN_BYTES)
        atomic_write(staged.admin_token_path, (admin_token + "\n").encode("ascii"), mode=0o600)
        store = Store(staged.store_path)
        try:
            audit = AuditLog(store)
            registry = Registry(store, audit, settings.trust_domain)
            with store.transaction() as db:
                registry.create_identity_in(db, OPERATOR_TENANT, OPERATOR_NAME, (OPERATOR_ROLE,))
        finally:
            store.close()
        ensure_server_certificate(ca, staged.server_cert_path, staged.server_key_path, server_names(settings))
        atomic_write(staged.outpostctl_config_path, outpostctl_config(settings, admin_token), mode=0o600)
        # WAL side files belong to a connection; none may travel with the rename.
        for leftover in (staging / "store.sqlite3-wal", staging / "store.sqlite3-shm"):
            leftover.unlink(missing_ok=True)
        os.chmod(staging, 0o700)
        fsync_directory(staging)
        try:
            os.rename(staging, final)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another process sharing this data directory created it first: use theirs.
            shutil.rmtree(staging, ignore_errors=True)
            return
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def open_data_dir(settings: Settings) -> ControllerContext:
    """Create the data directory if it is new, then load it into a context.

    ``settings.listen_port`` must already be the bound port. Raises StartupError.
    """
    try:
        if _is_fresh(settings.data_dir):
            _create(settings)
        return _load(settings)
    except StartupError:
        raise
    except OSError as error:
        where = error.filename or settings.data_dir
        raise StartupError(
            f"Cannot use the data directory {settings.data_dir} ({where}: {error.strerror}); "
            "check its permissions or choose another --data."
        ) from None


def _load(settings: Settings) -> ControllerContext:
    for required in (settings.ca_cert_path, settings.ca_key_path, settings.admin_token_path, settings.store_path):
        if not required.exists():
            raise StartupError(
                f"The data directory {settings.data_dir} is incomplete ({required.name} is missing); "
                "restore it from a backup or start with an empty directory."
            )
    ca = CertificateAuthority.load(settings.ca_cert_path, settings.ca_key_path, settings.trust_domain)
    admin_token = settings.admin_token_path.read_text(encoding="ascii").strip()
    ensure_private_dir(settings.server_cert_path.parent)
    server_cert, _ = ensure_server_certificate(
        ca, settings.server_cert_path, settings.server_key_path, server_names(settings)
    )
    config = outpostctl_config(settings, admin_token)
    path = settings.outpostctl_config_path
    # Rewritten only when it changed (a new port), so a restart touches nothing else.
    if not path.exists() or path.read_bytes() != config:
        atomic_write(path, config, mode=0o600)
    store = Store(settings.store_path)
    audit = AuditLog(store)
    registry = Registry(store, audit, settings.trust_domain)
    policy = PolicyEngine(store, audit)
    tokens = TokenAuthority(ca, audit, settings.base_url)
    enrollment = Enrollment(
        store, ca, registry, tokens, audit, settings.cert_lifetime, settings.session_lifetime
    )
    renewal = Renewal(store, ca, registry, audit, settings.cert_lifetime, settings.recovery_grace)
    return ControllerContext(
        settings=settings,
        store=store,
        ca=ca,
        registry=registry,
        policy=policy,
        audit=audit,
        tokens=tokens,
        enrollment=enrollment,
        renewal=renewal,
        server_certificate_der=server_cert.public_bytes(serialization.Encoding.DER),
        relay_urls=settings.relay_urls,
        admin_token=admin_token,
    )
