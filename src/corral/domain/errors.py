"""Errors that carry an HTTP meaning; the API turns them into `{"error": message}` bodies."""

from __future__ import annotations


class CorralError(Exception):
    """A request Corral refuses; `message` says what to fix."""

    status_code = 400

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(CorralError):
    status_code = 400


class NotFound(CorralError):
    status_code = 404


class Conflict(CorralError):
    """Valid input that the current state does not allow (e.g. not enough unassigned pods)."""

    status_code = 409


class Unavailable(CorralError):
    """The change is recorded but a part of reality (the data plane) has not confirmed it in time;
    the reconciler keeps applying it."""

    status_code = 503
