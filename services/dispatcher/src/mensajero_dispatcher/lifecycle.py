"""Waiting that a stop request cuts short."""

import asyncio
import contextlib


async def sleep_unless_stopped(stop: asyncio.Event, delay_s: float) -> None:
    """Sleep for `delay_s` seconds, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)
