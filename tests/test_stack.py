"""The local stack runner (`make run`), started as a real process."""

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_processes import Child, ProcessGroup, service_environment

from mensajero_common import stack
from mensajero_common.settings import DEFAULT_SECRET, Settings
from mensajero_common.testing import free_port, scaled

READY_LINE = b"Mensajero is running"
STARTED_LINE = re.compile(rb"started (\S+) \(pid (\d+)\)")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Not under tmp_path: pytest makes its base directory private to the user running
    # the tests, and under root the stack runs Postgres as the `postgres` user.
    path = Path(tempfile.mkdtemp(prefix="mensajero-stack-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _wait_for_line(child: Child, needle: bytes, timeout_s: float) -> None:
    async with asyncio.timeout(scaled(timeout_s)):
        while not any(needle in line for _, line in child.lines):
            assert child.process.returncode is None, "the stack runner exited"
            await asyncio.sleep(0.05)


def _started_pids(child: Child) -> dict[str, int]:
    pids = {}
    for _, line in child.lines:
        match = STARTED_LINE.search(line)
        if match:
            pids[match.group(1).decode()] = int(match.group(2))
    return pids


def _is_running(pid: int) -> bool:
    # A zombie has exited and waits for its parent to collect it, so it counts as stopped.
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


async def _start_stack(
    processes: ProcessGroup, settings: Settings, **overrides: object
) -> tuple[Child, int]:
    api_port = free_port()
    env = service_environment(
        settings,
        API_HOST="127.0.0.1",
        API_PORT=api_port,
        HUB_HOST="127.0.0.1",
        HUB_PORT=free_port(),
        LOG_JSON="false",
        **overrides,
    )
    runner = await processes.start(
        "stack", [sys.executable, "-m", "mensajero_common.stack"], env, read_stdout=True
    )
    return runner, api_port


@pytest.mark.e2e
async def test_stack_starts_own_servers(
    settings: Settings, processes: ProcessGroup, run_dir: Path
) -> None:
    postgres_port, redis_port = free_port(), free_port()
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:{postgres_port}/mensajero"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    runner, api_port = await _start_stack(
        processes,
        settings,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        MENSAJERO_RUN_DIR=run_dir,
    )

    await _wait_for_line(runner, READY_LINE, timeout_s=120)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{api_port}/healthz")
    assert response.status_code == 200
    pids = _started_pids(runner)
    assert {"postgres", "redis", "api", "hub", "dispatcher", "webhooks"} <= set(pids)

    runner.process.send_signal(signal.SIGTERM)
    returncode = await asyncio.wait_for(runner.process.wait(), scaled(30))

    assert returncode == 0
    assert not await stack.postgres_responds(database_url)
    assert not await stack.redis_responds(redis_url)
    assert [name for name, pid in pids.items() if _is_running(pid)] == []
    assert (run_dir / "postgres" / "PG_VERSION").exists()


async def _restarted_pid(runner: Child, name: str, old_pid: int) -> int:
    """Wait until the runner has started `name` again, and return its new pid."""
    async with asyncio.timeout(scaled(30)):
        while (pid := _started_pids(runner)[name]) == old_pid:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return pid


@pytest.mark.e2e
async def test_stack_restarts_service_that_dies(
    settings: Settings, processes: ProcessGroup, redis
) -> None:
    runner, api_port = await _start_stack(processes, settings)
    await _wait_for_line(runner, READY_LINE, timeout_s=60)
    first = _started_pids(runner)
    await asyncio.sleep(stack.RESTART_MIN_UPTIME_S)

    os.kill(first["dispatcher"], signal.SIGKILL)
    second_pid = await _restarted_pid(runner, "dispatcher", first["dispatcher"])
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{api_port}/healthz")

    assert any(b"starting it again" in line for _, line in runner.lines)
    assert runner.process.returncode is None
    assert response.status_code == 200

    # Well within RESTART_MIN_UPTIME_S of its restart, as a service failing on its own.
    os.kill(second_pid, signal.SIGKILL)
    returncode = await asyncio.wait_for(runner.process.wait(), scaled(30))

    assert returncode == 1
    assert any(b"so the whole stack stops" in line for _, line in runner.lines)
    assert [
        name for name, pid in _started_pids(runner).items() if _is_running(pid)
    ] == []


async def test_stack_names_missing_postgres(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(stack, "POSTGRES_BIN_PATTERNS", ())
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(stack.StackError) as raised:
        await stack.start_postgres(settings, tmp_path)

    assert "no postgres binary was found" in str(raised.value)
    assert "apt-get install postgresql" in str(raised.value)


async def test_stack_names_missing_redis(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(stack, "REDIS_BIN_DIRS", ())
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(stack.StackError) as raised:
        await stack.start_redis(settings, tmp_path)

    assert "no redis-server binary was found" in str(raised.value)
    assert "apt-get install redis-server" in str(raised.value)


async def test_stack_names_rejected_redis_database(
    settings: Settings, processes: ProcessGroup
) -> None:
    redis_url = settings.REDIS_URL.rsplit("/", 1)[0] + "/99"
    runner, _ = await _start_stack(processes, settings, REDIS_URL=redis_url)

    returncode = await asyncio.wait_for(runner.process.wait(), scaled(30))

    output = b"".join(line for _, line in runner.lines)
    assert returncode == 1
    assert b"the Redis at REDIS_URL rejects the connection" in output
    assert b"DB index is out of range" in output
    assert b"Traceback" not in output


async def test_stack_probes_servers(settings: Settings) -> None:
    assert await stack.postgres_responds(settings.DATABASE_URL)
    assert await stack.redis_responds(settings.REDIS_URL)
    assert not await stack.postgres_responds(
        f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/mensajero"
    )
    assert not await stack.redis_responds(f"redis://127.0.0.1:{free_port()}/0")


def test_local_secret_key_reused(run_dir: Path) -> None:
    first = stack.local_secret_key(run_dir)
    second = stack.local_secret_key(run_dir)

    path = run_dir / stack.SECRET_KEY_FILE
    assert second == first
    assert len(first) >= 64
    assert path.read_text().strip() == first
    assert path.stat().st_mode & 0o777 == 0o600


def test_local_secret_key_replaces_empty_file(run_dir: Path) -> None:
    (run_dir / stack.SECRET_KEY_FILE).write_text("\n")

    key = stack.local_secret_key(run_dir)

    assert key.strip() != ""
    assert stack.local_secret_key(run_dir) == key


def test_default_secret_key_replaced(
    settings: Settings, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SECRET_KEY", raising=False)
    default = settings.model_copy(update={"SECRET_KEY": DEFAULT_SECRET})

    used = stack.use_local_secret_key(default, run_dir)

    stored_key = stack.local_secret_key(run_dir)
    assert stored_key == used.SECRET_KEY
    assert os.environ["SECRET_KEY"] == stored_key


def test_own_secret_key_unchanged(
    settings: Settings, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SECRET_KEY", raising=False)

    used = stack.use_local_secret_key(settings, run_dir)

    assert used.SECRET_KEY == settings.SECRET_KEY
    assert "SECRET_KEY" not in os.environ
    assert not (run_dir / stack.SECRET_KEY_FILE).exists()


@pytest.mark.parametrize("webhook_timeout_s", [10.0, 20.0, 60.0])
def test_stop_waits_for_webhook_sender(webhook_timeout_s: float) -> None:
    from mensajero_webhooks.main import create_worker, drain_wait_s

    settings = Settings(WEBHOOK_TIMEOUT_S=webhook_timeout_s)
    worker = create_worker(settings)
    # arq waits for the running jobs, then on_shutdown for the drain tasks.
    sender_stop_s = worker._job_completion_wait + drain_wait_s(settings)

    assert stack.service_stop_timeout_s(settings) > sender_stop_s
