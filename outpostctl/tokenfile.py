"""Writing an enrollment token file: owner-only, whole or not at all, no clobbering.

A token file is a credential (anyone holding it can enroll a gateway), so it is
created 0600 and never written through a file or symlink someone placed
there. Replacing an existing file needs ``force``: the file the operator is
about to overwrite may be a token already promised to a technician.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from outpostctl.errors import TokenFileError

TOKEN_FILE_MODE = 0o600


def check_token_target(path: Path, *, force: bool) -> Path:
    """Refuse, before anything is created on the controller, a path we could not write.

    Returns the absolute path. A later ``write_token_file`` still re-checks,
    since the directory can change in between.
    """
    target = path.absolute()
    if target.is_dir():
        raise TokenFileError(f"{target} is a directory; give --token-out a file name such as {target / 'gateway.token'}")
    if (target.exists() or target.is_symlink()) and not force:
        raise TokenFileError(f"{target} already exists; choose another --token-out or pass --force to replace it")
    parent = target.parent
    if not parent.is_dir():
        raise TokenFileError(f"the folder {parent} does not exist; create it or choose another --token-out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TokenFileError(f"cannot write in {parent} (permission denied); choose another --token-out")
    return target


def write_token_file(path: Path, token: str, *, force: bool) -> Path:
    """Write ``token`` and a newline to ``path`` (mode 0600); returns the absolute path.

    Without ``force`` an existing file is left exactly as it was and
    TokenFileError is raised: the new file is linked into place with
    ``link(2)``, which fails rather than replace anything.
    """
    target = check_token_target(path, force=force)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TOKEN_FILE_MODE)
    except OSError as error:
        raise TokenFileError(f"cannot create a file in {target.parent} ({error.strerror}); choose another --token-out") from None
    try:
        try:
            os.fchmod(fd, TOKEN_FILE_MODE)
            view = memoryview((token.strip() + "\n").encode("utf-8"))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(temp, target)
        else:
            os.link(temp, target)
    except FileExistsError:
        raise TokenFileError(f"{target} already exists; choose another --token-out or pass --force to replace it") from None
    except OSError as error:
        raise TokenFileError(f"cannot write {target} ({error.strerror}); choose another --token-out") from None
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    _fsync_directory(target.parent)
    return target


def _fsync_directory(directory: Path) -> None:
    # The token exists only in this file: make its directory entry durable too.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
