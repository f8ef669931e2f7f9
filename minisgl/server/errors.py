"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`.

Invariant: no exception escapes a request handler as an unformatted 500 or a dropped connection; schema
errors and invalid JSON are 400s naming the offending field.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("minisgl.api")

_TYPES = {408: "timeout_error"}  # else: 4xx the client's mistake, 5xx the server's


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


class APIError(Exception):
    """An error to send to the client as is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse(self) -> str:
        """The same error as one server-sent event (for a stream that has already started)."""
        return f"data: {json.dumps(self.body())}\n\n"


def safe_text(value: object) -> str:
    """Client-supplied text made safe to echo: anything UTF-8 cannot encode (a lone UTF-16 surrogate such as
    "\\ud83d", which JSON allows) becomes a backslash escape instead of failing the response."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object; every string is made encodable, so building the response can never fail."""
    return {
        "error": {
            "message": safe_text(message),
            "type": error_type(status),
            "param": None if param is None else safe_text(param),
            "code": code,
        }
    }


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    param = next((p for p in loc if not p.isdigit()), None)
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    if first.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
        return f"unrecognized request argument supplied: {where}; this server does not implement it{more}", param
    return (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))) + more, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error handling %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)
