"""The error base shared by the services.

An AppError carries an HTTP status, a machine code (`error`, English) and the fields of its
localized message; the API renders it as
`{"success": false, "error": code, "message": localized text, **details}`.
"""

from typing import Any

from mensajero_common.i18n import translate


class AppError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        *,
        code: str | None = None,
        status_code: int | None = None,
        message_key: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> None:
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.message_key = message_key or self.code
        self.params = params
        self.details = details or {}
        self.headers = headers
        super().__init__(f"{self.code}: {params}")

    def message(self, language: str) -> str:
        return translate(self.message_key, language, **self.params)

    def to_body(self, language: str) -> dict[str, Any]:
        return {
            "success": False,
            "error": self.code,
            "message": self.message(language),
            **self.details,
        }


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"


class AuthenticationError(AppError):
    status_code = 401
    code = "not_authenticated"


class PermissionDeniedError(AppError):
    status_code = 403
    code = "forbidden"


class ConflictError(AppError):
    status_code = 409
    code = "conflict"


class ValidationFailedError(AppError):
    status_code = 400
    code = "validation_error"


class QuotaExceededError(AppError):
    status_code = 429
    code = "quota_exceeded"
