import asyncio
import os
import shutil
import signal

from arq import cron

from mensajero_common.settings import Settings
from mensajero_common.testing import scaled
from mensajero_webhooks.delivery.tasks import SWEEP_JOB, sweep
from mensajero_webhooks.main import create_worker


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


async def test_worker_runs_sweep_cron(settings, redis):
    every_second = cron(
        sweep,
        name=SWEEP_JOB,
        second=None,
        job_id=f"{settings.REDIS_KEY_PREFIX}:{SWEEP_JOB}",
    )
    worker = create_worker(
        settings, cron_jobs=[every_second], poll_delay=0.05, handle_signals=False
    )
    task = asyncio.create_task(worker.async_run())
    try:
        async with asyncio.timeout(scaled(5)):
            while worker.jobs_complete == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert "delivery" in worker.ctx
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()

    assert worker.jobs_failed == 0
    assert "engine" not in worker.ctx
    assert "http" not in worker.ctx


async def test_worker_process_stops_on_sigterm(settings, redis):
    executable = shutil.which("mensajero-webhooks")
    assert executable is not None
    process = await asyncio.create_subprocess_exec(
        executable,
        env=_environment(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    output = b""
    try:
        async with asyncio.timeout(scaled(15)):
            while b'"webhook-sender started"' not in output:
                line = await process.stderr.readline()
                assert line, output.decode()
                output += line
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), scaled(10))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0
    assert b'"webhook-sender stopped"' in rest
