import asyncio
import os
import shutil
import signal

from mensajero_common import queues
from mensajero_common.models import MessageStatus
from mensajero_common.settings import Settings
from mensajero_common.testing import scaled


def _environment(settings: Settings) -> dict[str, str]:
    variables = {
        name: str(getattr(settings, name))
        for name in (
            "ENVIRONMENT",
            "DATABASE_URL",
            "REDIS_URL",
            "REDIS_KEY_PREFIX",
            "SECRET_KEY",
            "FIRST_SUPERUSER",
            "FIRST_SUPERUSER_PASSWORD",
        )
    }
    return {**os.environ, **variables, "LOG_JSON": "true", "LOG_LEVEL": "INFO"}


async def test_process_assigns_then_stops_on_sigterm(
    settings, ctx, factory, wait_until
):
    user = await factory.user()
    await factory.device(user)
    message = await factory.message(user)
    executable = shutil.which("mensajero-dispatcher")
    assert executable is not None

    process = await asyncio.create_subprocess_exec(
        executable,
        env=_environment(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await queues.signal_new_messages(ctx.redis, ctx.keys, [message.id])

        async def assigned() -> bool:
            return (await factory.reload(message)).status == MessageStatus.ASSIGNED

        await wait_until(assigned, timeout_s=15)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), scaled(10))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0
    assert b'"dispatcher started"' in stderr
    assert b'"message assigned"' in stderr
    assert b'"dispatcher stopped"' in stderr
