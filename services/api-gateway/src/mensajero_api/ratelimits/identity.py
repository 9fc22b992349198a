"""Identification of the client of a request, for the rate limits."""

import hashlib
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import Scope

from mensajero_api.auth.security import TokenDecodeError, decode_access_token
from mensajero_common.settings import Settings
from mensajero_common.throttle import client_address, counted_address

KIND_USER = "user"
KIND_API_KEY = "api_key"
KIND_IP = "ip"
API_KEY_HEADER = "x-api-key"


@dataclass(frozen=True)
class ClientKey:
    # KIND_USER, KIND_API_KEY or KIND_IP. A new kind of credential gets a kind of its
    # own here, and its own branch in identify_client.
    kind: str
    value: str


def _bearer_token(scope: Scope) -> str | None:
    authorization = Headers(scope=scope).get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def identify_client(scope: Scope, settings: Settings) -> ClientKey:
    """Return the API key of the request, else the user of a valid bearer token, else
    the client's IP address (its /64 network for IPv6).

    Nothing here queries the database, so a flood costs no query. An API key counts by
    its SHA-256, so the key itself reaches neither Redis nor the logs, and an unknown key
    counts like a known one until the route returns 401. Only a token's signature and
    expiry are checked, so a token of a deleted user, or one revoked by a password
    change, counts for that user id until authentication rejects it and takes it out
    again (RequestRateLimiter.record_credential_failure).
    """
    api_key = Headers(scope=scope).get(API_KEY_HEADER, "").strip()
    if api_key:
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        return ClientKey(KIND_API_KEY, digest)

    token = _bearer_token(scope)
    if token is not None:
        try:
            claims = decode_access_token(token, settings)
        except TokenDecodeError:
            pass
        else:
            return ClientKey(KIND_USER, str(claims.user_id))
    return ClientKey(KIND_IP, counted_address(client_address(scope)))
