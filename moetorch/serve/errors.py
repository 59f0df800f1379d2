"""The server's request errors: an HTTP status and OpenAI's error shape, naming the field at fault."""

from __future__ import annotations


class BadRequest(ValueError):
    """A request the server refuses: `param` names the field, `status` the HTTP status (400 unless
    said), `kind` OpenAI's error type."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind
