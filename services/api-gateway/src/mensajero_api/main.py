"""The api-gateway application: `create_app()` for ASGI servers and tests, `main()` to run it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
import uvicorn
from fastapi import FastAPI

from mensajero_api.apikeys.routes import router as apikeys_router
from mensajero_api.auth.routes import router as auth_router
from mensajero_api.auth.security import PasswordHasher
from mensajero_api.auth.throttle import RULES_STATE_ATTRIBUTE, LoginThrottleRules
from mensajero_api.bulk.routes import router as bulk_router
from mensajero_api.cors import install_cors
from mensajero_api.devices.routes import router as devices_router
from mensajero_api.errors import install_error_handling
from mensajero_api.health.routes import router as health_router
from mensajero_api.limits import RequestBodyLimitMiddleware
from mensajero_api.messages.routes import router as messages_router
from mensajero_api.plans.routes import router as plans_router
from mensajero_api.quotas import repository as quotas_repository
from mensajero_api.quotas.routes import router as quotas_router
from mensajero_api.quotas.service import DefaultPlanMissingError
from mensajero_api.ratelimits import middleware as ratelimit_middleware
from mensajero_api.ratelimits.limiter import RequestRateLimiter
from mensajero_api.ratelimits.rules import RateLimitRules
from mensajero_api.resources import Resources
from mensajero_api.routing import HeadAsGetMiddleware, use_relative_slash_redirects
from mensajero_api.users.routes import router as users_router
from mensajero_api.users.service import ensure_first_superuser
from mensajero_api.webhooks.routes import router as webhooks_router
from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.keys import RedisKeys
from mensajero_common.logging import configure_logging
from mensajero_common.ops import MetricsMiddleware
from mensajero_common.redis import create_redis
from mensajero_common.settings import Settings, get_settings
from mensajero_common.startup import configure_garbage_collector

logger = structlog.get_logger(__name__)

SERVICE_NAME = "api-gateway"
# Large enough for a bulk send of 1000 recipients with a full-length body.
MAX_REQUEST_BODY_BYTES = 1024 * 1024

DESCRIPTION = """
Self-hosted SMS gateway: Android phones connected to the device-hub send and receive
the SMS that this API accepts and lists.

Authenticate with `POST /api/v1/login/access-token` (or the Authorize button) and send
`Authorization: Bearer <token>`; from a server, send a user API key
(`POST /api/v1/users/me/api-keys`) as `X-API-Key: <key>` instead.
Responses are `{"success": true, "data": …, "message": …}`;
errors are `{"success": false, "error": "<code>", "message": "<text>", …details}`, with
`message` in Spanish or English after `Accept-Language` (Spanish by default).

Rate limits: requests are counted per user (per client IP without a valid token, and
login and sign-up per IP too); past a limit the API answers 429 `rate_limited` with a
`Retry-After` header in seconds. Plan limits answer 429 `quota_exceeded` instead.
"""


async def _check_default_plan(resources: Resources) -> None:
    async with resources.session_factory() as session:
        plan_code = resources.settings.DEFAULT_PLAN
        plan = await quotas_repository.get_plan_by_code(session, plan_code)
        if plan is None:
            raise DefaultPlanMissingError(plan_code)
        # New users would get a plan that the plan listing hides and that no upgrade
        # can choose again.
        if not plan.is_active:
            raise DefaultPlanMissingError(plan_code, inactive=True)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the engine and Redis, create the first superuser, and close both at the end."""
    settings: Settings = app.state.settings
    engine = create_engine(settings, application_name="mensajero-api-gateway")
    redis = create_redis(settings)
    resources = Resources(
        settings=settings,
        engine=engine,
        session_factory=create_session_factory(engine),
        redis=redis,
        keys=RedisKeys(settings.REDIS_KEY_PREFIX),
        passwords=PasswordHasher(),
    )
    if settings.RATE_LIMIT_ENABLED:
        setattr(
            app.state,
            ratelimit_middleware.STATE_ATTRIBUTE,
            RequestRateLimiter(
                app.state.rate_limit_rules, settings, redis, resources.keys
            ),
        )
    try:
        try:
            await _check_default_plan(resources)
            await ensure_first_superuser(
                resources.session_factory, resources.passwords, settings
            )
        except Exception as error:
            # The URLs are left out of the log because they may contain passwords.
            logger.error("api-gateway failed to start", error=str(error))
            raise
        app.state.resources = resources
        logger.info("api-gateway started", environment=settings.ENVIRONMENT.value)
        yield
    finally:
        logger.info("api-gateway stopping")
        await redis.aclose()
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="Mensajero API",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url="/docs",
        redoc_url="/redoc",
        lifespan=lifespan,
    )
    app.state.settings = settings or get_settings()
    # Parsed here so that a malformed RATE_LIMIT_* setting stops the start at once.
    app.state.rate_limit_rules = RateLimitRules.from_settings(app.state.settings)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(
        RequestBodyLimitMiddleware, max_body_bytes=MAX_REQUEST_BODY_BYTES
    )
    # Added after the body limit, so it runs before it and refuses a flood unread.
    app.add_middleware(ratelimit_middleware.RateLimitMiddleware)
    app.add_middleware(MetricsMiddleware, service=SERVICE_NAME)
    install_error_handling(app)
    install_cors(app, app.state.settings)
    setattr(
        app.state,
        RULES_STATE_ATTRIBUTE,
        LoginThrottleRules.from_settings(app.state.settings),
    )
    for router in (
        health_router,
        auth_router,
        users_router,
        apikeys_router,
        devices_router,
        messages_router,
        bulk_router,
        plans_router,
        quotas_router,
        webhooks_router,
    ):
        app.include_router(router)
    use_relative_slash_redirects(app.router)
    return app


def main() -> None:
    """Serve the API with uvicorn on API_HOST:API_PORT."""
    settings = get_settings()
    configure_logging(settings, SERVICE_NAME)
    app = create_app(settings)
    configure_garbage_collector()
    # log_config=None keeps uvicorn from replacing the logging set up just above.
    uvicorn.run(
        app,
        host=settings.API_HOST,
        port=settings.API_PORT,
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,
        log_config=None,
    )


if __name__ == "__main__":
    main()
