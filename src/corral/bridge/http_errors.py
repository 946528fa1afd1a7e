"""How every failure of the HTTP API becomes `{"error": {"code", "message", "hint"}}`.

    BridgeError                the Bridge's own code and status (Retry-After on 429 and 503)
    RequestValidationError     400 malformed_request: not JSON, not an object, a field unknown,
                               missing or of the wrong type; 422 invalid_parameter: a value out
                               of range (a query value, timeout_s)
    HTTPException 404 / 405    not_found / method_not_allowed (with Allow)
    anything else              500 internal; the traceback goes to the log, never to the client

No default FastAPI or Starlette error body is ever served.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.bridge.errors import BridgeError
from corral.bridge.http_gate import error_body
from corral.bridge.ratelimit import retry_after_header

log = logging.getLogger("corral.bridge.http")


def _json_error(
    status: int, code: str, message: str, hint: str = "", headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, hint), status_code=status, headers=headers)


_RETRY_CODES = frozenset({"rate_limited", "too_many_jobs"})
# Pydantic error types that mean the body is not the expected JSON object at all.
_MALFORMED_TYPES = frozenset(
    {
        "json_invalid",
        "json_type",
        "model_attributes_type",
        "model_type",
        "dict_type",
        "missing",
        "extra_forbidden",
        "bool_type",
        "string_type",
        "float_type",
        "int_type",
        "list_type",
    }
)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BridgeError)
    async def bridge_error(request: Request, exc: BridgeError) -> JSONResponse:
        headers = {}
        if exc.code in _RETRY_CODES:
            after = exc.detail.get("retry_after_s", 1)
            headers["Retry-After"] = retry_after_header(
                float(after) if isinstance(after, int | float) else 1.0
            )
        return JSONResponse(exc.as_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            return _json_error(
                404,
                "not_found",
                f"no such endpoint: {request.url.path}",
                "GET /openapi.json lists the endpoints",
            )
        if exc.status_code == 405:
            return _json_error(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path}",
                f"allowed: {headers.get('Allow', '?')}",
                headers,
            )
        code = "malformed_request" if exc.status_code == 400 else "internal"
        return _json_error(exc.status_code, code, str(exc.detail), "", headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(
            500,
            "internal",
            "the bridge failed to serve this request",
            "the server's log has the details",
        )


def _validation_response(errors: Sequence[Any]) -> JSONResponse:
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        message = f"the body is not valid JSON: {reason}".rstrip(": ")
    else:
        where = ".".join(part for part in location if part != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
    if first.get("type") in _MALFORMED_TYPES:
        status, code, hint = 400, "malformed_request", "GET /openapi.json describes each body"
    else:
        status, code, hint = 422, "invalid_parameter", "GET /openapi.json gives each limit"
    body = {
        "error": {"code": code, "message": message, "hint": hint, "detail": {"location": location}}
    }
    return JSONResponse(body, status_code=status)
