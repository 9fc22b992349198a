"""The hub process: its resources, every open device session, the channel router and the
heartbeat sweep.

Per-device work (a wake, a revoke, a replaced connection) goes only to that device's
sessions. Only two things touch every session: the shutdown, and the catch-up after the
pub/sub connection to Redis was lost.
"""

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

import structlog
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common import protocol
from mensajero_common.db import create_engine, create_session_factory
from mensajero_common.keys import RedisKeys
from mensajero_common.ops import ReadinessCheck, postgres_check, redis_check
from mensajero_common.settings import Settings
from mensajero_common.throttle import FailureLimit
from mensajero_common.transient import is_transient
from mensajero_hub.core import frames
from mensajero_hub.core.channels import DeviceChannelRouter
from mensajero_hub.core.frames import AuthThrottledError, InvalidApiKeyError
from mensajero_hub.core.heartbeat import DeadlineQueue, sweep_interval_s
from mensajero_hub.core.service import DeviceService
from mensajero_hub.core.session import DeviceSession, Transport

log = structlog.get_logger(__name__)

# A hub keeps this many times DATABASE_POOL_SIZE connections: frames of thousands of phones
# share them, and a reconnect storm waits in line instead of exhausting the server.
DB_POOL_FACTOR = 1.5
# Redis connections of one hub, the pub/sub one included; callers wait for a free one.
REDIS_MAX_CONNECTIONS = 64
REDIS_POOL_TIMEOUT_S = 20.0
# How long the shutdown waits for sessions to record that their device went offline.
SHUTDOWN_RELEASE_TIMEOUT_S = 10.0


def create_hub_redis(settings: Settings) -> ArqRedis:
    """Open a Redis client with a bounded pool, so 10,000 phones reconnecting at once
    queue for connections instead of opening one each."""
    pool = BlockingConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=REDIS_POOL_TIMEOUT_S,
        health_check_interval=30,
    )
    return ArqRedis(connection_pool=pool)


class Hub:
    def __init__(self, settings: Settings, auth_limit: FailureLimit) -> None:
        self.settings = settings
        self.auth_limit = auth_limit
        self.keys = RedisKeys(settings.REDIS_KEY_PREFIX)
        self._engine: AsyncEngine | None = None
        self._redis: ArqRedis | None = None
        self._service: DeviceService | None = None
        self._router: DeviceChannelRouter | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Each device maps to its session, or to a list while it has more than one. A
        # device has one connection except while a newer one replaces it, so a list per
        # idle device would cost memory for nothing.
        self._sessions: dict[uuid.UUID, DeviceSession | list[DeviceSession]] = {}
        self._deadlines: DeadlineQueue[DeviceSession] = DeadlineQueue(
            settings.WEBSOCKET_HEARTBEAT_TIMEOUT,
            last_activity_s=lambda session: session.state.last_frame_at_s,
            is_open=lambda session: session.is_open,
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._all_released = asyncio.Event()
        self._all_released.set()
        self.closing = False

    # Lifecycle.

    async def start(self) -> None:
        """Open Postgres and Redis, subscribe the shared channel reader, start the sweep."""
        self._engine = create_engine(
            self.settings,
            pool_size=int(self.settings.DATABASE_POOL_SIZE * DB_POOL_FACTOR),
            application_name="mensajero-device-hub",
        )
        self._redis = create_hub_redis(self.settings)
        self._service = DeviceService(
            self.settings,
            create_session_factory(self._engine),
            self._redis,
            self.keys,
            self.auth_limit,
        )
        self._service.presence.start()
        self._service.reports.start()
        self._router = DeviceChannelRouter(
            self._redis, self.keys, self._on_channel_message, self._wake_all
        )
        await self._router.start()
        self._sweeper = asyncio.create_task(
            self._sweep_silent_sessions(), name="heartbeat-sweep"
        )
        log.info("device hub started")

    async def stop(self) -> None:
        """Close every session with 1012 so phones reconnect elsewhere, then the resources.

        Tasks stay in the device streams; the phones get them again on reconnect.
        """
        # 1. Refuse new connections.
        self.closing = True

        # 2. Close what uvicorn did not close already and wait for each session to release.
        await asyncio.gather(
            *(
                session.close(
                    protocol.CLOSE_SERVICE_RESTART, frames.REASON_SERVICE_RESTART
                )
                for session in self.sessions()
            )
        )
        try:
            async with asyncio.timeout(SHUTDOWN_RELEASE_TIMEOUT_S):
                await self._all_released.wait()
        except TimeoutError:
            log.warning("sessions still open at shutdown", count=self.session_count())
            for session in self.sessions():
                await self.release(session, protocol.CLOSE_SERVICE_RESTART)

        # 3. Stop the background work; the writers first write what is queued.
        if self._service is not None:
            await self._service.reports.stop()
            await self._service.presence.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in [self._sweeper, *self._background]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task failed during shutdown")
        if self._router is not None:
            await self._router.stop()

        # 4. Close the connections to Redis and Postgres.
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
        if self._engine is not None:
            await self._engine.dispose()
        log.info("device hub stopped")

    @property
    def service(self) -> DeviceService:
        if self._service is None:
            raise RuntimeError("the hub is not started")
        return self._service

    def now_s(self) -> float:
        return asyncio.get_running_loop().time()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a short per-device job without blocking the caller, keeping a reference."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def sessions(self) -> list[DeviceSession]:
        found: list[DeviceSession] = []
        for entry in self._sessions.values():
            if isinstance(entry, list):
                found.extend(entry)
            else:
                found.append(entry)
        return found

    def session_count(self) -> int:
        return sum(
            len(entry) if isinstance(entry, list) else 1
            for entry in self._sessions.values()
        )

    def readiness_checks(self) -> dict[str, ReadinessCheck]:
        """Return the checks of /readyz: the hub's Postgres engine and Redis client."""
        if self._engine is None or self._redis is None:
            return {}
        return {
            "postgres": postgres_check(self._engine),
            "redis": redis_check(self._redis),
        }

    # Sessions.

    async def open_session(
        self,
        transport: Transport,
        api_key: str | None,
        language: str,
        client_address: str,
    ) -> DeviceSession | None:
        """Authenticate a new connection and start its session, or close it and return None.

        `client_address` is the IP address that failed authentications count against.
        """
        if self.closing:
            await transport.close(
                protocol.CLOSE_SERVICE_RESTART, frames.REASON_SERVICE_RESTART
            )
            return None

        try:
            identity = await self.service.authenticate(api_key, client_address)
        except AuthThrottledError as error:
            # DEBUG only: the throttle logged once at INFO when the address reached it.
            log.debug(
                "connection throttled",
                client_address=client_address,
                retry_after_s=error.retry_after_s,
            )
            await transport.send(
                frames.error_reply(
                    "too_many_auth_failures",
                    language,
                    details={"limit": error.limit, "retry_after": error.retry_after_s},
                    retry_after=error.retry_after_s,
                )
            )
            await transport.close(protocol.CLOSE_AUTH_THROTTLED, error.close_reason)
            return None
        except InvalidApiKeyError as error:
            log.info(
                "connection rejected",
                reason=error.reason,
                client_address=client_address,
            )
            await transport.send(
                frames.error_reply("invalid_api_key", language, reason=error.reason)
            )
            await transport.close(protocol.CLOSE_INVALID_API_KEY, error.close_reason)
            return None
        except Exception as error:
            if not is_transient(error):
                log.exception("authentication failed")
                await transport.close(1011, frames.REASON_INTERNAL_ERROR)
                return None
            log.warning(
                "authentication failed: Postgres or Redis is unavailable",
                error=repr(error),
                client_address=client_address,
            )
            await transport.close(
                protocol.CLOSE_TRY_AGAIN_LATER, frames.REASON_TRY_AGAIN_LATER
            )
            return None

        session = DeviceSession(
            self, self.service, identity, transport, language, self.now_s()
        )
        self._add_session(session)
        self._all_released.clear()
        self._deadlines.add(session)
        try:
            await self._subscribe(session)
            await session.start()
        except Exception as error:
            if is_transient(error):
                session.log.warning(
                    "opening the session failed: Postgres or Redis is unavailable",
                    error=repr(error),
                )
                code, reason = (
                    protocol.CLOSE_TRY_AGAIN_LATER,
                    frames.REASON_TRY_AGAIN_LATER,
                )
            else:
                session.log.exception("opening the session failed")
                code, reason = 1011, frames.REASON_INTERNAL_ERROR
            await session.close(code, reason)
            await self.release(session, code)
            return None

        session.log.info("device connected")
        return session

    async def release(self, session: DeviceSession, code: int | None) -> None:
        """Forget a closed session and mark its device offline unless it reconnected."""
        if session.released:
            return
        session.released = True
        session.stop_background_work()

        self._remove_session(session)

        try:
            if session.subscribed and self._router is not None:
                await self._router.unsubscribe(session.device_id)
            await self.service.go_offline(
                session.device_id, session.connection_id, session.state.heartbeat_at
            )
        except Exception:
            # The connection key expires on its own and the dispatcher's sweep marks the
            # device offline.
            session.log.exception("recording the disconnect failed")
        finally:
            if not self._sessions:
                self._all_released.set()

        session.log.info(
            "device disconnected",
            code=session.close_code or code,
            reason=session.close_reason,
            duration_s=round(self.now_s() - session.state.opened_at_s, 3),
        )

    def _add_session(self, session: DeviceSession) -> None:
        entry = self._sessions.get(session.device_id)
        if entry is None:
            self._sessions[session.device_id] = session
        elif isinstance(entry, list):
            entry.append(session)
        else:
            self._sessions[session.device_id] = [entry, session]

    def _remove_session(self, session: DeviceSession) -> None:
        entry = self._sessions.get(session.device_id)
        if entry is session:
            del self._sessions[session.device_id]
        elif isinstance(entry, list) and session in entry:
            entry.remove(session)
            if len(entry) == 1:
                self._sessions[session.device_id] = entry[0]

    async def _subscribe(self, session: DeviceSession) -> None:
        if self._router is None:
            raise RuntimeError("the hub is not started")
        await self._router.subscribe(session.device_id)
        session.subscribed = True

    def _on_channel_message(self, device_id: uuid.UUID, data: bytes) -> None:
        entry = self._sessions.get(device_id)
        if entry is None:
            return
        if not isinstance(entry, list):
            entry.on_channel_message(data)
            return
        for session in list(entry):
            session.on_channel_message(data)

    def _wake_all(self) -> None:
        """Make every session read its stream again after wakes may have been lost."""
        for session in self.sessions():
            session.wake()

    async def _sweep_silent_sessions(self) -> None:
        interval_s = sweep_interval_s(self.settings.WEBSOCKET_HEARTBEAT_TIMEOUT)
        reason = frames.heartbeat_timeout_reason(
            self.settings.WEBSOCKET_HEARTBEAT_TIMEOUT
        )
        while True:
            await asyncio.sleep(interval_s)
            for session in self._deadlines.pop_expired(self.now_s()):
                session.log.info("closing silent connection")
                self.spawn(session.close(protocol.CLOSE_HEARTBEAT_TIMEOUT, reason))
            self._deadlines.compact(self.session_count())
