"""Frame rate limit of one device connection: `rate_limited` errors, then close 4029."""

from hub_helpers import (
    create_device,
    create_outgoing,
    load_message,
    open_socket,
    receive,
    receive_type,
    send,
    serve_hub,
    wait_closed,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from structlog.testing import capture_logs

from mensajero_common import protocol
from mensajero_common.models import MessageStatus
from mensajero_common.settings import Settings
from mensajero_hub.core.state import FRAME_BURST_S, FrameBucket


def test_frame_bucket_refills_at_rate() -> None:
    bucket = FrameBucket.full(2, now_s=0.0)
    admitted = sum(bucket.admit(0.0) for _ in range(2 * FRAME_BURST_S))

    assert admitted == 2 * FRAME_BURST_S
    assert not bucket.admit(0.0)
    assert bucket.consecutive_rejections == 1
    assert bucket.retry_after_s() == 1
    assert bucket.admit(0.5)
    assert bucket.consecutive_rejections == 0
    assert not bucket.admit(0.5)


async def test_flood_gets_errors_then_close(
    settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    test_settings = settings.model_copy(
        update={"DEVICE_FRAMES_PER_SECOND": 1, "DEVICE_FRAME_FLOOD_MAX_ERRORS": 3}
    )
    device = await create_device(session_factory)
    async with (
        serve_hub(test_settings) as url,
        open_socket(url, device.api_key) as socket,
    ):
        # Sent without waiting for replies, so no token flows in meanwhile.
        for _ in range(FRAME_BURST_S + 3):
            await send(socket, {"type": "ping", "request_id": "flood"})
        replies = [await receive(socket) for _ in range(FRAME_BURST_S + 3)]
        code, reason = await wait_closed(socket)

    pongs, errors = replies[:FRAME_BURST_S], replies[FRAME_BURST_S:]
    assert [pong["type"] for pong in pongs] == ["pong"] * FRAME_BURST_S

    for error in errors:
        assert error["type"] == "error"
        assert error["error"] == "rate_limited"
        assert error["limit"] == "1/s"
        assert error["retry_after"] >= 1
        assert "1 por segundo" in error["message"]
        assert "request_id" not in error
    assert code == protocol.CLOSE_RATE_LIMITED
    assert "rate limited" in reason


async def test_frames_after_flood_close_ignored(
    settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    test_settings = settings.model_copy(
        update={"DEVICE_FRAMES_PER_SECOND": 1, "DEVICE_FRAME_FLOOD_MAX_ERRORS": 3}
    )
    device = await create_device(session_factory)
    with capture_logs() as logs:
        async with (
            serve_hub(test_settings) as url,
            open_socket(url, device.api_key) as socket,
        ):
            # Far more frames than the burst and the errors before the close, sent
            # without waiting for replies.
            for _ in range(FRAME_BURST_S + 30):
                await send(socket, {"type": "ping"})
            code, _ = await wait_closed(socket)

    flood_closes = [
        log for log in logs if log["event"] == "closing after a frame flood"
    ]
    rejections = [log for log in logs if log["event"] == "frame rate limited"]
    assert code == protocol.CLOSE_RATE_LIMITED
    # The frames that arrive once the close is under way get no error and no log.
    assert len(flood_closes) == 1
    assert len(rejections) == 1


async def test_over_limit_report_not_applied(
    settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    test_settings = settings.model_copy(
        update={"DEVICE_FRAMES_PER_SECOND": 1, "DEVICE_FRAME_FLOOD_MAX_ERRORS": 5}
    )
    device = await create_device(session_factory)
    message = await create_outgoing(session_factory, device)
    async with (
        serve_hub(test_settings) as url,
        open_socket(url, device.api_key) as socket,
    ):
        for _ in range(FRAME_BURST_S):
            await send(socket, {"type": "ping"})
        report = {
            "type": "sms_report",
            "message_id": str(message.id),
            "status": "sending",
            "attempt": 1,
        }
        await send(socket, report)
        error = await receive_type(socket, "error")

    assert error["error"] == "rate_limited"
    stored = await load_message(session_factory, message.id)
    assert stored.status == MessageStatus.ASSIGNED


async def test_default_limit_allows_report_burst(
    settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    # 20 tasks at once: `sending`, `sent` and `delivered` for each, plus one ping, all
    # sent without waiting for the replies.
    frame_count = 20 * 3 + 1
    device = await create_device(session_factory)
    async with (
        serve_hub(settings) as url,
        open_socket(url, device.api_key) as socket,
    ):
        for index in range(frame_count):
            await send(socket, {"type": "ping", "request_id": str(index)})
        replies = [await receive(socket) for _ in range(frame_count)]

    assert [reply["type"] for reply in replies] == ["pong"] * frame_count
