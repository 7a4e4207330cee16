"""The base of every expected failure, and the exit codes every command shares.

Every error carries the one plain sentence the user will read (what went wrong
and what to do), and the process exit code the CLI returns for it. The CLIs
print ``str(error)`` and nothing else: no tracebacks for expected failures.
The agent's own errors (agent/errors.py) and the controller's
(controller/errors.py) subclass ``OutpostError``.
"""

from __future__ import annotations

# Exit codes follow sysexits(3) where one fits, so that systemd units can
# refuse to restart where a restart cannot help (RestartPreventExitStatus=).
EXIT_FAILURE = 1
EXIT_USAGE = 64  # EX_USAGE: bad command line or config value
EXIT_DATAERR = 65  # EX_DATAERR: a bad token or input file
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: controller/relay unreachable, try later
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: a retry later may succeed


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
