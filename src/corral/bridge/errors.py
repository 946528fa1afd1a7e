"""The one error the bridge reports to agents, with a stable code and its HTTP status.

    CorralError
    └── BridgeError        .code (stable snake_case), .status (HTTP), .message, .hint, .detail

Whose fault it is, by status: 4xx the agent's request (or a human's decision), 5xx the bridge.
Front ends map `code` 1:1 to their own error shape: every error an agent sees is
`{"error": {"code": ..., "message": ..., "hint": ...}}` (see `as_json`).
"""

from __future__ import annotations

from collections.abc import Mapping

from corral.errors import CorralError

# Every code and its HTTP status. Stable: agents and front ends match on these strings.
CODES: dict[str, int] = {
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_command": 404,
    "unknown_job": 404,
    "unknown_approval": 404,
    "missing_parameter": 422,
    "unexpected_parameter": 422,
    "invalid_parameter": 422,
    "path_outside_workspace": 422,
    "request_too_large": 413,
    "rate_limited": 429,
    "too_many_jobs": 503,
    "denied": 403,
    "approval_timeout": 403,
    "malformed_request": 400,
    "not_pending": 409,
    "internal": 500,
}


class BridgeError(CorralError):
    """A request the bridge refuses, or could not serve. `status` defaults to the code's own
    (see CODES); `detail` carries machine-readable context (the parameter, the job id...)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        hint: str = "",
        detail: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.status = status if status is not None else CODES.get(code, 400)
        self.detail: dict[str, object] = dict(detail or {})
        # For the CLI: 2 when the request was at fault (a wrong id, a decided approval),
        # 1 when the bridge was.
        self.exit_code = 1 if self.status >= 500 else 2

    def as_json(self) -> dict[str, object]:
        """The error body every front end returns: {"error": {code, message, hint[, detail]}}."""
        body: dict[str, object] = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.detail:
            body["detail"] = self.detail
        return {"error": body}
