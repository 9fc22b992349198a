"""Cross-origin requests from browsers, for the origins in BACKEND_CORS_ORIGINS only."""

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from mensajero_common.settings import Settings

# Headers a browser client may send: the credentials, the body type, and the API's own.
ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-API-Key",
    "Idempotency-Key",
    "Accept-Language",
)
# Response headers a browser client may read besides the CORS-safelisted ones.
EXPOSED_HEADERS = ("Retry-After", "Idempotent-Replayed", "Content-Language")
# Seconds a browser may cache a preflight response.
PREFLIGHT_MAX_AGE_S = 600


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Serve CORS requests from the configured origins; add nothing when none is set.

    Settings validation rejects "*" together with credentials, so every origin that gets
    credentials is one the operator listed.
    """
    if not settings.BACKEND_CORS_ORIGINS:
        return
    # Added last, so it is the outermost middleware: preflights and error responses (401,
    # 429) carry the CORS headers too, and browsers can read them.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.BACKEND_CORS_ORIGINS,
        allow_credentials=settings.BACKEND_CORS_ALLOW_CREDENTIALS,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=PREFLIGHT_MAX_AGE_S,
    )
