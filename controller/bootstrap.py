"""The data directory: created complete on first start, reused on every later one.

A first start builds everything in a hidden sibling directory (the staging
directory, ``.NAME.XXXXXXXX.creating``) and renames it into place, so a
failure (disk full, killed) never leaves a half-made data directory behind.

A SIGKILL or a power cut during that first start leaves the staging
directory, with a CA private key in it. Every start removes such leftovers
of its own data directory, under a lock that every start holds while it
looks for leftovers or builds a staging directory (an ``flock`` on the
parent directory): a staging directory found while holding the lock belongs
to no running process. The kernel drops the lock of a killed process, so a
leftover is removed at the very next start, however soon it comes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from controller.admin_credential import AdminCredential, data_dir_owner, migrate_plaintext, new_token, write_hash
from controller.audit import AuditLog
from controller.audit_chain import load_or_create_key
from controller.ca import CertificateAuthority, ensure_server_certificate
from controller.context import ControllerContext
from controller.enrollment import Enrollment
from controller.errors import StartupError
from controller.policy import PolicyEngine
from controller.registry import Registry
from controller.renewal import Renewal
from controller.settings import LISTENER_CERT_RENEW_FRACTION, WILDCARD_HOSTS, Settings
from controller.store import Store
from controller.tokens import TokenAuthority
from shared.fsutil import atomic_write, ensure_private_dir, fsync_directory

log = logging.getLogger(__name__)

#: How long a start waits for another process creating a data directory in the
#: same parent: a first start (a CA key, a listener certificate, an empty
#: store) takes well under a second; a minute covers a loaded, slow board.
CREATION_LOCK_TIMEOUT = 60.0
#: How often a waiting start tries the lock again: a twentieth of a second
#: costs nothing and adds little to a start that waits.
CREATION_LOCK_POLL = 0.05
STAGING_SUFFIX = ".creating"
#: Random hex digits in a staging directory's name (two starts never collide).
STAGING_TAG_BYTES = 4
#: The identity `outpostctl connect` acts as; it can dial nothing until a policy allows it.
OPERATOR_NAME = "operator"
OPERATOR_ROLE = "operator"
OPERATOR_TENANT = "default"


def server_names(settings: Settings) -> list[str]:
    """Every name the listener's certificate must cover."""
    names = ["localhost", socket.gethostname(), "127.0.0.1", "::1"]
    for host in (settings.listen_host, settings.api_listen_host):
        if host is not None and host not in WILDCARD_HOSTS:
            names.append(host)
    names.extend(settings.extra_sans)
    for url in (settings.base_url, settings.api_url):
        advertised = _url_host(url)
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
    """The TOML `outpostctl` reads: where the management API is, its CA and the credential."""
    ca_path = str(settings.ca_cert_path.resolve())

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "# Written by outpost-controller; the token is the management credential and this file its only copy:",
        "# keep it private (move it to the operator's ~/.config/outpost/). The controller keeps only a hash.",
        f"url = {quoted(settings.api_url)}",
        f"ca = {quoted(ca_path)}",
        f"token = {quoted(admin_token)}",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def token_in_config(path: Path) -> str | None:
    """The admin token an existing outpostctl.toml holds (None if there is none or it is unreadable)."""
    import tomllib

    try:
        value = tomllib.loads(path.read_text(encoding="utf-8")).get("token")
    except (OSError, ValueError):
        return None
    return value.strip() if isinstance(value, str) and value.strip() else None


def refresh_outpostctl_config(settings: Settings) -> None:
    """Point an existing outpostctl.toml at this start's URL, keeping its token; never create one.

    The controller has no plaintext to write into a new file: if the file was
    moved away (as it should be, to the operator), nothing is written.
    """
    path = settings.outpostctl_config_path
    token = token_in_config(path) if path.exists() else None
    if token is None:
        return
    config = outpostctl_config(settings, token)
    # Rewritten only when it changed (a new port), so a restart touches nothing else.
    if path.read_bytes() != config:
        atomic_write(path, config, mode=0o600)


def listener_cert_lifetimes(settings: Settings) -> tuple[datetime.timedelta, datetime.timedelta]:
    """(lifetime, renew when less than this is left) of the listener's certificate."""
    lifetime = datetime.timedelta(seconds=settings.listener_cert_lifetime)
    return lifetime, lifetime * (1 - LISTENER_CERT_RENEW_FRACTION)


def _is_fresh(data_dir: Path) -> bool:
    return not data_dir.exists() or (data_dir.is_dir() and not any(data_dir.iterdir()))


def staging_pattern(data_dir: Path) -> re.Pattern[str]:
    """The names of ``data_dir``'s staging directories, and of no other directory's."""
    return re.compile(rf"\.{re.escape(data_dir.name)}\.[0-9a-f]{{{2 * STAGING_TAG_BYTES}}}{re.escape(STAGING_SUFFIX)}")


@contextlib.contextmanager
def creation_lock(data_dir: Path) -> Iterator[None]:
    """Held while a start looks for leftovers of ``data_dir`` or creates it: an flock on its parent.

    A parent this process may not read cannot be locked (nor searched for
    leftovers); the start goes on without, as it did before the lock existed.
    """
    parent = data_dir.parent
    if not parent.is_dir():
        raise StartupError(
            f"The parent of the data directory {data_dir} does not exist; create it or choose another --data."
        )
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        log.warning("cannot read %s: leftovers of an interrupted first start are not looked for", parent)
        yield
        return
    try:
        deadline = time.monotonic() + CREATION_LOCK_TIMEOUT
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    log.info("waiting for another process creating a data directory in %s", parent)
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"Another process has been creating a data directory in {parent} for over "
                        f"{CREATION_LOCK_TIMEOUT:g} s; wait for it or stop it, then start again."
                    ) from None
                time.sleep(CREATION_LOCK_POLL)
        yield
    finally:
        os.close(fd)  # and with it the lock


def remove_interrupted_creations(data_dir: Path) -> list[Path]:
    """Delete the staging directories of ``data_dir`` left by a start that died; the paths removed.

    Only under ``creation_lock``: then no running process is building one.
    Only this user's directories, never what a symbolic link points to.
    """
    pattern = staging_pattern(data_dir)
    removed = []
    with os.scandir(data_dir.parent) as entries:
        for entry in entries:
            if (
                pattern.fullmatch(entry.name)
                and entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_uid == os.geteuid()
            ):
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
    if removed:
        fsync_directory(data_dir.parent)
        for path in removed:
            log.warning("removed %s, left by a first start that was interrupted (it held a CA key)", path)
    return removed


def _create(settings: Settings) -> None:
    """Build a complete data directory in a staging sibling, then rename it into place."""
    final = settings.data_dir
    parent = final.parent
    staging = parent / f".{final.name}.{secrets.token_hex(STAGING_TAG_BYTES)}{STAGING_SUFFIX}"
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
        admin_token = new_token()
        write_hash(staged.admin_hash_path, admin_token)
        store = Store(staged.store_location)
        try:
            claim_store(store, ca.fingerprint)
            audit = AuditLog(store, chain_key=load_or_create_key(staging))
            registry = Registry(store, audit, settings.trust_domain)
            with store.transaction() as db:
                # A shared store already has it when another controller created it first.
                if registry.get_identity_in(db, OPERATOR_TENANT, OPERATOR_NAME) is None:
                    registry.create_identity_in(db, OPERATOR_TENANT, OPERATOR_NAME, (OPERATOR_ROLE,))
        finally:
            store.close()
        ensure_server_certificate(ca, staged.server_cert_path, staged.server_key_path, server_names(settings),
                                  *listener_cert_lifetimes(settings))
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


def claim_store(store: Store, ca_fingerprint: str) -> None:
    """Record which CA the store belongs to, or refuse a store that belongs to another CA.

    Every process sharing a store must share the data directory's CA (a copy
    of it): a certificate another CA signed would be refused by every agent,
    and a token it signed by every other controller.
    """
    with store.transaction() as db:
        row = db.query_one("SELECT value FROM meta WHERE key = 'ca_fingerprint'")
        if row is None:
            db.execute("INSERT INTO meta (key, value) VALUES ('ca_fingerprint', ?)", (ca_fingerprint,))
        elif row["value"] != ca_fingerprint:
            raise StartupError(
                f"The store {store.describe()} belongs to the controller whose CA is {row['value']}, "
                f"not to this data directory's CA ({ca_fingerprint}); give this controller a copy of that "
                "controller's data directory, or another store."
            )


def open_data_dir(settings: Settings) -> ControllerContext:
    """Create the data directory if it is new, then load it into a context.

    ``settings.listen_port`` must already be the bound port. Raises StartupError.
    """
    try:
        with creation_lock(settings.data_dir):
            remove_interrupted_creations(settings.data_dir)
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
    required_files = [settings.ca_cert_path, settings.ca_key_path]
    if settings.store_url is None:
        required_files.append(settings.store_path)
    for required in required_files:
        if not required.exists():
            raise StartupError(
                f"The data directory {settings.data_dir} is incomplete ({required.name} is missing); "
                "restore it from a backup or start with an empty directory."
            )
    ca = CertificateAuthority.load(settings.ca_cert_path, settings.ca_key_path, settings.trust_domain)
    migrate_plaintext(settings.admin_token_path, settings.admin_hash_path)
    admin = AdminCredential(settings.admin_hash_path)
    ensure_private_dir(settings.server_cert_path.parent)
    server_cert, _ = ensure_server_certificate(
        ca, settings.server_cert_path, settings.server_key_path, server_names(settings),
        *listener_cert_lifetimes(settings),
    )
    store = Store(settings.store_location)
    try:
        claim_store(store, ca.fingerprint)
    except BaseException:
        store.close()
        raise
    refresh_outpostctl_config(settings)
    # Every controller sharing a store holds the same audit.key, as it holds the same CA (docs/deployment.md).
    audit = AuditLog(store, chain_key=load_or_create_key(settings.data_dir))
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
        admin=admin,
    )


def rotate_admin_token(data_dir: Path, out: Path | None = None, url: str | None = None) -> Path:
    """Make a new admin token: its hash replaces ``admin.hash``, its plaintext goes to an outpostctl.toml only.

    A running controller notices the new hash at its next management request,
    so the old token stops working at once. The new outpostctl.toml is written
    before the hash, so a crash in between leaves the old token working and
    the command can simply be run again. Returns the file written.
    """
    settings = Settings(data_dir=data_dir)
    # The store may be elsewhere (--store postgresql://...): the CA is what makes a data directory.
    if not settings.ca_cert_path.is_file() or not settings.admin_hash_path.is_file():
        raise StartupError(f"{data_dir} is not a controller data directory (no ca/ca.pem or admin.hash); check --data.")
    target = out or settings.outpostctl_config_path
    if url is None:
        import tomllib

        for existing in (target, settings.outpostctl_config_path):
            try:
                found = tomllib.loads(existing.read_text(encoding="utf-8")).get("url")
            except (OSError, ValueError):
                continue
            if isinstance(found, str) and found.startswith("https://"):
                url = found
                break
    if url is None:
        raise StartupError(
            f"No outpostctl.toml in {data_dir} says where the management API is; "
            "pass --url https://HOST:PORT (the controller's --advertise or --api-listen address)."
        )
    if not url.startswith("https://") or any(char.isspace() or char in "\"\\" for char in url):
        raise StartupError(f"--url {url!r} must be the management API's base URL, like https://controller.example:8443.")
    token = new_token()
    config = outpostctl_config(dataclasses.replace(settings, advertise_url=url), token)
    try:
        owner = data_dir_owner(data_dir)
        atomic_write(target, config, mode=0o600)
        if owner is not None and target.parent == data_dir:
            os.chown(target, *owner)  # the data directory's files stay its user's
        write_hash(settings.admin_hash_path, token, owner)
        settings.admin_token_path.unlink(missing_ok=True)  # a plaintext left by an older version is void now
    except OSError as error:
        raise StartupError(
            f"Cannot write {error.filename or target} ({error.strerror}); run the command as the controller's user."
        ) from None
    log.info("admin credential rotated; the new token is in %s", target)
    return target
