"""The errors the controller answers with.

Every error has a stable machine code (clients switch on it), the HTTP status
it travels with, and the one plain sentence a user reads, saying what to do.
"""

from __future__ import annotations

from shared.errors import OutpostError


class ControllerError(OutpostError):
    """An expected refusal: ``code`` for machines, ``str()`` for people."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class BodyRefused(ControllerError):
    """A request refused before its content was read: too large, not JSON, not a JSON object."""


class StartupError(OutpostError):
    """``outpost-controller serve`` cannot start (bad flag, data dir, port in use)."""


def bad_request(code: str, message: str) -> ControllerError:
    return ControllerError(code, message, 400)


def not_found(code: str, message: str) -> ControllerError:
    return ControllerError(code, message, 404)


def conflict(code: str, message: str) -> ControllerError:
    return ControllerError(code, message, 409)


def forbidden(code: str, message: str) -> ControllerError:
    return ControllerError(code, message, 403)


def unknown_identity(tenant: str, name: str) -> ControllerError:
    return not_found("identity_unknown", f"There is no identity {tenant}/{name}; check the name and tenant.")
