"""Controller errors. Each class carries the HTTP status ``http.errors_mw`` answers with."""

from __future__ import annotations

from agent.errors import DeviceError, EdgeopsError


class ControllerError(EdgeopsError):
    status = 500


class BadRequest(ControllerError):
    status = 400
    hint = "see docs/fleet-controller.md for the request shapes"


class Unauthorized(ControllerError):
    status = 401
    hint = "send 'Authorization: TargetToken <token>' (devices) or 'Bearer <token>' (operators)"


class NotFound(ControllerError):
    status = 404


class Conflict(ControllerError):
    status = 409


class RequestTimeout(ControllerError):
    status = 408
    hint = "send the whole request body promptly"


class DatabaseRefused(DeviceError):
    """The database exists but cannot be used: damaged, empty, or not a controller's (exit 20,
    like a device's damaged journal: a service manager should not restart into it)."""

    hint = ("restore it from a backup, or move it aside to start a new fleet; "
            "'controller serve --init' makes a new database in an empty file")


class TooLarge(ControllerError):
    status = 413
    hint = "send less: see docs/fleet-controller.md for the limits"


class Overloaded(ControllerError):
    """More database work is waiting than the controller will queue: come back later.
    ``http.errors_mw`` answers 429 with ``Retry-After: retry_after`` (RFC 9110 section 10.2.3,
    RFC 6585 section 4), which the edgeops agent honours (``agent.errors.Throttled``)."""

    status = 429
    hint = "the controller is busy; retry after the number of seconds in Retry-After"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ReaderBusy(Exception):
    """The reader connection found the database busy (``db.reading``): the read goes to the
    writer thread instead of holding the event loop (``dbexec.read``). Never reaches a client."""
