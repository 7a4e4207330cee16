"""The errors an operator of ``outpostctl`` can meet.

They extend the agent's hierarchy (``agent.errors``) so that one rule holds
across every Outpost command: ``str(error)`` is the sentence the user reads,
``exit_code`` is what the process returns.
"""

from __future__ import annotations

from agent.errors import (
    EXIT_DATAERR,
    EXIT_FAILURE,
    EXIT_USAGE,
    ConfigError,
    ControllerUnreachable,
    OutpostError,
    TrustError,
)

__all__ = [
    "ApiError",
    "ConfigError",
    "ControllerUnreachable",
    "CredentialRefused",
    "OutpostError",
    "TokenFileError",
    "TrustError",
]


class ApiError(OutpostError):
    """The controller answered with an error: ``{"error": code, "message": sentence}``."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        #: The controller's stable machine code (``identity_unknown``...), or "".
        self.code = code
        #: The HTTP status of the answer.
        self.status = status


class CredentialRefused(ApiError):
    """The controller answered 401: the admin token in the config is not valid."""

    exit_code = EXIT_USAGE


class TokenFileError(OutpostError):
    """An enrollment token file could not be written where the operator asked."""

    exit_code = EXIT_DATAERR
