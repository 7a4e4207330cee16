"""The errors a user of the agent can meet.

Every error carries the one plain sentence the user will read (what went wrong
and what to do), and the process exit code the CLI returns for it. The CLI
prints ``str(error)`` and nothing else: no tracebacks for expected failures.
"""

from __future__ import annotations

# Exit codes follow sysexits(3) where one fits, so that systemd units can
# refuse to restart where a restart cannot help (RestartPreventExitStatus=).
# Each outcome only a person can end has a code of its own, so that the exit
# status alone tells a technician what to do.
EXIT_FAILURE = 1
EXIT_USAGE = 64  # EX_USAGE: bad command line or config value
EXIT_DATAERR = 65  # EX_DATAERR: a bad token or input file
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: controller/relay unreachable, try later
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: a retry later may succeed
EXIT_IDENTITY_REFUSED = 77  # EX_NOPERM: the controller refuses this identity (revoked, disabled, offline too long)
EXIT_IDENTITY_LOST = 78  # EX_CONFIG: the device key is gone (TPM cleared or replaced, key file damaged); re-enroll
# sysexits(3) has nothing for it: the TPM refused the agent's authorization
# (someone set a password); retrying would count toward the TPM's lockout.
EXIT_TPM_AUTH_REFUSED = 79
#: What systemd must not restart (the agent unit's RestartPreventExitStatus=).
NOT_RESTARTED_EXIT_CODES = frozenset(
    {EXIT_USAGE, EXIT_DATAERR, EXIT_IDENTITY_REFUSED, EXIT_IDENTITY_LOST, EXIT_TPM_AUTH_REFUSED}
)


class OutpostError(Exception):
    """Base of every expected failure; ``str()`` is the sentence for the user."""

    exit_code = EXIT_FAILURE
    #: True where trying again later (network back, clock fixed) can help.
    retryable = False
    #: True where the running agent must stop instead of trying again: only a
    #: person can help (re-enroll, fix the TPM), and each try would cost the TPM.
    terminal = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(OutpostError):
    """A configuration file, flag or environment value is wrong."""

    exit_code = EXIT_USAGE


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
