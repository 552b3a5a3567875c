"""Errors: every failure the HTTP layer answers becomes OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for anything the client
sent and never a stack trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("remix_serve.errors")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: an error message may quote what the client sent, which need not be
    encodable text (a lone surrogate in a field name)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error that becomes an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()

    def response(self) -> JSONResponse:
        return ErrorJSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def invalid_json(detail: str = "") -> APIError:
    return APIError(400, f"Invalid JSON body{': ' + detail if detail else ''}", code="invalid_json")


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error, as a 400 naming the field (`param`) that caused it."""
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if "[key]" in loc:  # a dict's key failed: name the dict (the key need not be printable)
        loc = loc[: loc.index("[key]") - 1]
    # Union members add their type to the location (prompt.str, prompt.list[int]...): drop them.
    loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return invalid_json()
    if kind == "model_attributes_type" and param is None:
        return APIError(400, "The request body must be a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    else:
        msg = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
    return APIError(400, msg, param=param, code="invalid_value")


def from_http_exception(exc: StarletteHTTPException) -> APIError:
    """Starlette's and FastAPI's own errors (404 route, 405 method, a body FastAPI could not
    parse), in OpenAI's shape."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        cause = exc.__cause__
        if isinstance(cause, RecursionError):
            return invalid_json("nested too deeply")
        if isinstance(cause, UnicodeDecodeError):
            return invalid_json("not valid UTF-8")
        return invalid_json(str(cause) if isinstance(cause, json.JSONDecodeError) else "")
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers)


INTERNAL = "The server had an error while processing your request"

ErrorObserver = Callable[[Request, int], None]


def install_error_handlers(app: FastAPI, observe: ErrorObserver) -> None:
    """Every error answer goes through here; `observe(request, status)` sees each one (the
    admission layer counts the /v1 requests it refused)."""

    def answer(request: Request, err: APIError) -> JSONResponse:
        observe(request, err.status)
        return err.response()

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return answer(request, exc)

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return answer(request, from_validation_error(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return answer(request, from_http_exception(exc))

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return answer(request, APIError(500, INTERNAL, "server_error"))

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        APIError: api_error,
        RequestValidationError: validation,
        StarletteHTTPException: http_error,
        Exception: internal,
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
