"""The server's request errors: an HTTP status and OpenAI's error shape, naming the field at fault."""

from __future__ import annotations


class BadRequest(ValueError):
    """A request the server refuses: `param` names the field, `status` the HTTP status (400 unless
    said), `kind` OpenAI's error type, `code` its error code (`model_not_found`, ...) or None."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code
