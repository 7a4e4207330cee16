"""The errors a user of the agent can meet; their base, ``OutpostError``, is shared/errors.py.

Every error carries the one plain sentence the user will read (what went wrong
and what to do), and the process exit code the CLI returns for it. The CLI
prints ``str(error)`` and nothing else: no tracebacks for expected failures.
"""

from __future__ import annotations

from shared.errors import EXIT_DATAERR as EXIT_DATAERR
from shared.errors import EXIT_FAILURE as EXIT_FAILURE
from shared.errors import EXIT_TEMPFAIL as EXIT_TEMPFAIL
from shared.errors import EXIT_UNAVAILABLE as EXIT_UNAVAILABLE
from shared.errors import EXIT_USAGE as EXIT_USAGE
from shared.errors import ConfigError as ConfigError
from shared.errors import OutpostError as OutpostError

# The exit codes of shared/errors.py, and those only the agent returns. Each
# outcome only a person can end has a code of its own, so that the exit
# status alone tells a technician what to do.
EXIT_IDENTITY_REFUSED = 77  # EX_NOPERM: the controller refuses this identity (revoked, disabled, offline too long)
EXIT_IDENTITY_LOST = 78  # EX_CONFIG: the device key is gone (TPM cleared or replaced, key file damaged); re-enroll
# sysexits(3) has nothing for it: the TPM refused the agent's authorization
# (someone set a password); retrying would count toward the TPM's lockout.
EXIT_TPM_AUTH_REFUSED = 79
#: What systemd must not restart (the agent unit's RestartPreventExitStatus=).
NOT_RESTARTED_EXIT_CODES = frozenset(
    {EXIT_USAGE, EXIT_DATAERR, EXIT_IDENTITY_REFUSED, EXIT_IDENTITY_LOST, EXIT_TPM_AUTH_REFUSED}
)


class TokenError(OutpostError):
    """An enrollment token is unusable (expired, tampered, used, malformed)."""

    exit_code = EXIT_DATAERR


class TrustError(OutpostError):
    """A peer presented a certificate or signature we must not trust."""

    exit_code = EXIT_DATAERR


class EnrollmentError(OutpostError):
    """The controller refused enrollment, or it could not complete."""


class NotEnrolledError(OutpostError):
    """The agent has no identity yet."""

    exit_code = EXIT_TEMPFAIL


class ControllerUnreachable(OutpostError):
    """The network path to the controller or relay failed; retry later."""

    exit_code = EXIT_UNAVAILABLE
    retryable = True


class RelayBusy(ControllerUnreachable):
    """The relay is admitting as many tunnels as it can and said when to come back (``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProxyFailed(ControllerUnreachable):
    """The HTTPS proxy could not be reached (``status`` None) or refused the CONNECT with HTTP ``status``."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KeyStoreError(OutpostError):
    """The device key store failed."""


class KeyStoreBusy(KeyStoreError):
    """The TPM is busy or rate-limited; retry with backoff."""

    exit_code = EXIT_TEMPFAIL
    retryable = True


class TpmLockedOut(KeyStoreError):
    """The TPM is in dictionary-attack lockout; it passes with time (minutes to hours), not in seconds."""

    exit_code = EXIT_TEMPFAIL
    retryable = True


class TpmAuthorizationRefused(KeyStoreError):
    """The TPM refused the agent's authorization; never retried (wrong passwords walk it into lockout)."""

    exit_code = EXIT_TPM_AUTH_REFUSED
    terminal = True


class DeviceKeyLost(KeyStoreError):
    """The device key no longer exists (TPM cleared or replaced, blob corrupt)."""

    exit_code = EXIT_IDENTITY_LOST
    terminal = True


class ClockError(OutpostError):
    """The local clock is too far off to make a safe decision."""

    exit_code = EXIT_TEMPFAIL
    retryable = True


class TunnelRefused(OutpostError):
    """The relay refused the tunnel (revoked, unknown identity, bad signature)."""

    exit_code = EXIT_TEMPFAIL


class TunnelFailed(OutpostError):
    """The tunnel broke down on this end's side of the protocol (the core refused what this end did)."""

    exit_code = EXIT_TEMPFAIL
