"""Settings shared by every service, read from environment variables (and `.env`)."""

import ipaddress
import json
import sys
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SECRET = "changethis"
# Minimums outside development. RFC 7518, section 3.2, requires a key of at least 256
# bits for HS256, which signs the tokens. The password minimum is sign-up's.
MIN_SECRET_KEY_BYTES = 32
MIN_SUPERUSER_PASSWORD_LENGTH = 8


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=True
    )

    ENVIRONMENT: Environment = Environment.DEVELOPMENT
    DATABASE_URL: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/mensajero"
    # Connections each process may keep open to Postgres (opened as needed, then kept),
    # and how many more it may open under bursts. Every replica of every service adds its
    # own, so their sum must stay below the server's max_connections (100 by default).
    # Overflow connections are closed as soon as they are idle, so a steady load above
    # the pool size opens and closes one per request: keep it 0 unless connections are
    # scarce.
    DATABASE_POOL_SIZE: Annotated[int, Field(ge=1)] = 20
    DATABASE_MAX_OVERFLOW: Annotated[int, Field(ge=0)] = 0
    # Seconds that the services wait for a new Postgres connection, and for a statement's
    # result. Without them, a Postgres host that stopped responding (behind a firewall
    # that drops packets, for example) left requests waiting until TCP gave up. The
    # migrations do not use them, because an index build may take longer.
    DATABASE_CONNECT_TIMEOUT_S: Annotated[float, Field(gt=0)] = 10.0
    DATABASE_COMMAND_TIMEOUT_S: Annotated[float, Field(gt=0)] = 30.0
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    # Every Redis key the project writes starts with this, so that several installs or test
    # runs can share one Redis server.
    REDIS_KEY_PREFIX: str = "mensajero"

    API_HOST: str = "127.0.0.1"
    API_PORT: Annotated[int, Field(ge=0, le=65535)] = 8000
    HUB_HOST: str = "127.0.0.1"
    HUB_PORT: Annotated[int, Field(ge=0, le=65535)] = 8001
    # Peers whose X-Forwarded-For and X-Forwarded-Proto headers the API and the device-hub
    # trust: IP addresses and networks separated by commas, "*" for every peer, or empty
    # for none. uvicorn takes the client's address from the rightmost X-Forwarded-For
    # entry that is not trusted, or with "*" from the leftmost one. Behind a proxy that is
    # not listed, every client seems to come from the proxy and shares its per-address
    # limits.
    FORWARDED_ALLOW_IPS: str = "127.0.0.1,::1"

    # Health, readiness and metrics endpoints of the workers (dispatcher, webhook-sender),
    # which have no HTTP app of their own; 0 turns them off.
    OPS_HOST: str = "127.0.0.1"
    DISPATCHER_OPS_PORT: Annotated[int, Field(ge=0, le=65535)] = 9101
    WEBHOOKS_OPS_PORT: Annotated[int, Field(ge=0, le=65535)] = 9102

    SECRET_KEY: str = DEFAULT_SECRET
    ACCESS_TOKEN_EXPIRE_MINUTES: Annotated[int, Field(gt=0)] = 60 * 24
    FIRST_SUPERUSER: str = "admin@example.com"
    FIRST_SUPERUSER_PASSWORD: str = DEFAULT_SECRET

    WEBSOCKET_HEARTBEAT_TIMEOUT: Annotated[int, Field(gt=0, description="seconds")] = (
        300
    )
    WEBSOCKET_PING_INTERVAL: Annotated[int, Field(gt=0, description="seconds")] = 60
    WEBSOCKET_MAX_FRAME_BYTES: Annotated[int, Field(gt=0)] = 64 * 1024
    # Day of the month whose midnight (UTC) starts a new monthly SMS quota; at most 28 so
    # that every month has it.
    QUOTA_RESET_DAY: Annotated[int, Field(ge=1, le=28)] = 1
    DEFAULT_PLAN: str = "free"
    # How often the dispatcher looks for quota rows not yet reset since the latest reset
    # day. Between runs, a row is reset anyway when it is read or charged.
    QUOTA_RESET_CHECK_INTERVAL_S: Annotated[float, Field(gt=0)] = 600.0

    # Recipients (or personalised messages) accepted by one bulk send.
    BULK_MAX_RECIPIENTS: Annotated[int, Field(ge=1, le=10_000)] = 1000

    # Rate limits of the REST API, in the notation of the `limits` package: one or more
    # "<count>/<period>" items separated by ";", e.g. "20/second;600/minute".
    RATE_LIMIT_ENABLED: bool = True
    # Requests of one authenticated user: room for a dashboard that polls and a script
    # that sends one SMS per request, not for a runaway loop.
    RATE_LIMIT_PER_USER: str = "100/second;3000/minute"
    # Requests that carry a user API key (X-API-Key), per key.
    RATE_LIMIT_PER_API_KEY: str = "100/second;3000/minute"
    # Requests without valid credentials, per client IP address.
    RATE_LIMIT_PER_IP: str = "10/second;120/minute"
    # Login and sign-up attempts per client IP address, on top of the limits above.
    RATE_LIMIT_LOGIN_PER_IP: str = "20/minute"

    # Frames one device may send to the device-hub per second before it gets `error`
    # frames, and how many such errors in a row make the hub close the connection.
    DEVICE_FRAMES_PER_SECOND: Annotated[int, Field(ge=1)] = 20
    DEVICE_FRAME_FLOOD_MAX_ERRORS: Annotated[int, Field(ge=1)] = 10
    # SMS one device is handed per minute. Stock Android asks the user before an app sends
    # more than its SmsUsageMonitor allows (30 SMS in 30 minutes in AOSP 4.0 and 4.1), and
    # carriers block SIMs that send in bursts, so a gateway phone needs that check raised
    # and a steady pace.
    DEVICE_SMS_PER_MINUTE: Annotated[int, Field(ge=1)] = 10
    # Failed device authentications (missing, unknown, expired or disabled keys) allowed
    # per client address before the device-hub rejects that address's connections with
    # close code 4030, valid keys included, until the oldest failure leaves the window.
    # In the notation of the `limits` package, and counted in Redis across every replica.
    DEVICE_AUTH_FAILURES_PER_IP: str = "20/minute;200/hour"

    # Language of user-facing messages when the request's Accept-Language names none we have.
    DEFAULT_LANGUAGE: str = "es"
    SMS_MAX_BODY_LENGTH: Annotated[int, Field(gt=0, description="characters")] = 1600
    DEVICE_API_KEY_PREFIX: str = "mdk_"
    # User API keys (the REST API's X-API-Key) start with this. Neither prefix may start
    # with the other, so that the API can tell a device key apart and reject it.
    USER_API_KEY_PREFIX: str = "mak_"
    # Failed logins allowed before the API answers 429, in the notation of the `limits`
    # package: per account (the email as typed, whether or not it exists) and per client
    # address. A correct password clears the account's count.
    LOGIN_FAILURES_PER_ACCOUNT: str = "5/minute;20/hour"
    LOGIN_FAILURES_PER_IP: str = "30/minute;300/hour"
    # Browser origins allowed to call the API (CORS), e.g. "https://panel.example.com", as
    # a JSON list or separated by commas; empty allows none. "*" allows every origin and
    # is rejected while BACKEND_CORS_ALLOW_CREDENTIALS is true.
    BACKEND_CORS_ORIGINS: Annotated[list[str], NoDecode] = []
    BACKEND_CORS_ALLOW_CREDENTIALS: bool = True
    # Bodies of SMS stay out of logs unless this is set, for debugging only.
    LOG_MESSAGE_BODIES: bool = False
    LOG_LEVEL: str = "INFO"
    LOG_JSON: bool = True

    WEBHOOK_TIMEOUT_S: Annotated[float, Field(gt=0)] = 10.0
    # Attempts per delivery, the first included.
    WEBHOOK_MAX_ATTEMPTS: Annotated[int, Field(ge=1, le=20)] = 3
    # Delay before the second attempt; each later one doubles it, with random jitter.
    WEBHOOK_RETRY_BASE_DELAY_S: Annotated[float, Field(ge=0)] = 10.0
    WEBHOOK_CONCURRENCY: Annotated[int, Field(ge=1)] = 50
    # Attempts in flight to one webhook in one webhook-sender process. A delivery beyond
    # it waits in the process, not in one of the WEBHOOK_CONCURRENCY slots, so an endpoint
    # that never responds cannot take every slot.
    WEBHOOK_CONCURRENCY_PER_WEBHOOK: Annotated[int, Field(ge=1)] = 10
    # Consecutive failed attempts (timeout, connection error, 429 or 5xx) after which a
    # webhook is paused for WEBHOOK_BREAKER_OPEN_S seconds, after which one attempt probes
    # it. 0 never pauses. Pausing delays attempts and never drops one.
    WEBHOOK_BREAKER_FAILURES: Annotated[int, Field(ge=0)] = 5
    WEBHOOK_BREAKER_OPEN_S: Annotated[float, Field(gt=0)] = 30.0
    # How often the webhook-sender looks in Postgres for deliveries whose job Redis lost.
    WEBHOOK_SWEEP_INTERVAL_S: Annotated[float, Field(gt=0)] = 30.0
    # Whether webhook URLs may point at loopback, private or link-local addresses. Unset, they
    # may everywhere but in production.
    WEBHOOK_ALLOW_PRIVATE_URLS: bool | None = None

    # Pending-message sweep of the dispatcher, in seconds.
    DISPATCHER_SWEEP_INTERVAL: Annotated[float, Field(gt=0)] = 30.0

    # Attempts to send one message, the first included. Only a `failed` report from which
    # no SMS part went out starts another attempt; docs/reliability.md has every rule.
    MESSAGE_MAX_ATTEMPTS: Annotated[int, Field(ge=1, le=20)] = 3
    # Wait between a failed attempt and the next one, in seconds.
    MESSAGE_RETRY_DELAY_S: Annotated[float, Field(ge=0)] = 30.0
    # A task that no phone acknowledged (no `sending` report) for this many seconds moves
    # to another online device of the user when its device is offline or silent (after
    # 10 times as long when it is alive), unless the sender asked for that device.
    TASK_ACK_TIMEOUT_S: Annotated[float, Field(gt=0)] = 60.0
    # A task acknowledged (`sending`) and not finished (`sent` or `failed`) for this many
    # seconds ends `failed` with the error `no_report`; it is never sent elsewhere, since
    # the SMS may have gone out.
    TASK_REPORT_TIMEOUT_S: Annotated[float, Field(gt=0)] = 900.0
    # A message that is not final and has not changed for this many seconds is put back
    # in flight from Postgres: its task pushed again, or its assignment retried.
    RECOVERY_STALE_AFTER_S: Annotated[float, Field(gt=0)] = 120.0
    # How often the dispatcher looks for due retries, passed deadlines and expired
    # messages, in seconds.
    MESSAGE_CHECK_INTERVAL_S: Annotated[float, Field(gt=0)] = 5.0

    @model_validator(mode="after")
    def _reject_default_secrets(self) -> "Settings":
        if self.ENVIRONMENT == Environment.DEVELOPMENT:
            return self

        for name in ("SECRET_KEY", "FIRST_SUPERUSER_PASSWORD"):
            if getattr(self, name) == DEFAULT_SECRET:
                raise ValueError(
                    f"{name} is still the default {DEFAULT_SECRET!r}; "
                    f"set it to a secret value when ENVIRONMENT is {self.ENVIRONMENT.value}"
                )
        if len(self.SECRET_KEY.encode()) < MIN_SECRET_KEY_BYTES:
            raise ValueError(
                f"SECRET_KEY is shorter than {MIN_SECRET_KEY_BYTES} bytes; set a random "
                f"one (openssl rand -hex 32) when ENVIRONMENT is {self.ENVIRONMENT.value}"
            )
        if len(self.FIRST_SUPERUSER_PASSWORD) < MIN_SUPERUSER_PASSWORD_LENGTH:
            raise ValueError(
                f"FIRST_SUPERUSER_PASSWORD is shorter than "
                f"{MIN_SUPERUSER_PASSWORD_LENGTH} characters, the minimum sign-up asks "
                f"of every password; set a longer one when ENVIRONMENT is "
                f"{self.ENVIRONMENT.value}"
            )
        return self

    @field_validator("FORWARDED_ALLOW_IPS")
    @classmethod
    def _check_forwarded_allow_ips(cls, value: str) -> str:
        # uvicorn silently treats an entry that is not an address or network as a name
        # that no peer matches, so a typo would make every client share the proxy's address.
        entries = [entry.strip() for entry in value.split(",")]
        if entries == [""]:
            return ""
        if entries == ["*"]:
            return "*"
        for entry in entries:
            _check_forwarded_entry(entry)
        return ",".join(entries)

    @field_validator("BACKEND_CORS_ORIGINS", mode="before")
    @classmethod
    def _parse_cors_origins(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]

    @field_validator("BACKEND_CORS_ORIGINS")
    @classmethod
    def _normalize_cors_origins(cls, origins: list[str]) -> list[str]:
        return [_normalize_origin(origin) for origin in origins]

    @model_validator(mode="after")
    def _reject_wildcard_cors_with_credentials(self) -> "Settings":
        # Browsers refuse `Access-Control-Allow-Origin: *` on a request with credentials,
        # and echoing every origin instead would let any site act as the signed-in user.
        if "*" in self.BACKEND_CORS_ORIGINS and self.BACKEND_CORS_ALLOW_CREDENTIALS:
            raise ValueError(
                'BACKEND_CORS_ORIGINS contains "*" while BACKEND_CORS_ALLOW_CREDENTIALS '
                "is true; list the allowed origins, or set "
                "BACKEND_CORS_ALLOW_CREDENTIALS=false"
            )
        return self

    @model_validator(mode="after")
    def _reject_overlapping_key_prefixes(self) -> "Settings":
        device, user = self.DEVICE_API_KEY_PREFIX, self.USER_API_KEY_PREFIX
        if not device or not user or device.startswith(user) or user.startswith(device):
            raise ValueError(
                f"DEVICE_API_KEY_PREFIX {device!r} and USER_API_KEY_PREFIX {user!r} must "
                "be non-empty and neither may start with the other"
            )
        return self

    @property
    def is_production(self) -> bool:
        return self.ENVIRONMENT == Environment.PRODUCTION

    @property
    def webhook_private_urls_allowed(self) -> bool:
        if self.WEBHOOK_ALLOW_PRIVATE_URLS is not None:
            return self.WEBHOOK_ALLOW_PRIVATE_URLS
        return not self.is_production


def _check_forwarded_entry(entry: str) -> None:
    """Raise ValueError unless `entry` is an IP address or network as uvicorn parses them."""
    try:
        if "/" in entry:
            ipaddress.ip_network(entry)
        else:
            ipaddress.ip_address(entry)
    except ValueError:
        raise ValueError(
            f"{entry!r} is not an IP address or network (such as 10.0.0.0/8 with no "
            'host bits set); list addresses and networks separated by commas, or "*" '
            "alone to trust every peer"
        ) from None


def _normalize_origin(origin: str) -> str:
    """Return `origin` as scheme://host[:port] in lower case, or raise ValueError."""
    origin = origin.strip()
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise ValueError(
            f"invalid CORS origin {origin!r}: expected scheme://host[:port], "
            "e.g. https://panel.example.com"
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


def describe_validation_error(error: ValidationError) -> str:
    """Render a settings validation error as one line per invalid setting."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        lines.append(f"invalid setting {name}: {item['msg']}")
    return "\n".join(lines)


@lru_cache
def get_settings() -> Settings:
    """Load the settings once, or exit with a message that names each invalid setting."""
    try:
        return Settings()
    except ValidationError as error:
        sys.stderr.write(describe_validation_error(error) + "\n")
        raise SystemExit(2) from None
