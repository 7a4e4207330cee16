"""Refusals of a sign-in: one code for machines, one sentence for the person."""

from __future__ import annotations

from controller.errors import ControllerError


class SigninRefused(ControllerError):
    """A sign-in, or a session, the controller does not accept (401 unless said otherwise)."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(code, message, status)


class ProviderUnavailable(ControllerError):
    """The identity provider could not be reached or answered nonsense (502)."""

    def __init__(self, message: str) -> None:
        super().__init__("provider_unavailable", message, 502)
