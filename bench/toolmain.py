"""Shared entry point of the benchmark's helper processes (bench.tools.*)."""

import asyncio
import json
import resource
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

# The orchestrator reads the last stdout line that starts with this as the result.
RESULT_PREFIX = "BENCH_RESULT "


def cpu_seconds_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(line: dict[str, Any], prefix: str = "") -> None:
    sys.stdout.write(prefix + json.dumps(line) + "\n")
    sys.stdout.flush()


def read_options() -> dict[str, Any]:
    """Return the JSON options in the file named by argv[1] (none without it)."""
    if len(sys.argv) < 2:
        return {}
    options: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    return options


def run_tool(
    main: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]],
) -> None:
    """Run `main(options)` on uvloop with the options of argv[1]; print its result."""
    options = read_options()
    raise_open_file_limit()
    result = uvloop.run(main(options))
    result["cpu_s"] = round(cpu_seconds_self(), 3)
    emit(result, RESULT_PREFIX)


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader


CommandHandler = Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]


async def serve_commands(handlers: dict[str, CommandHandler]) -> None:
    """Answer JSON commands read from stdin, one result line each, until `stop` or EOF.

    Each command is `{"command": <name>, ...options}`; the reply carries the handler's
    result, or `{"error": ...}` if it raised.
    """
    reader = await _stdin_reader()
    while line := await reader.readline():
        command = json.loads(line)
        name = command.pop("command")
        handler = handlers.get(name)
        if handler is None:
            emit({"error": f"unknown command {name!r}"}, RESULT_PREFIX)
            continue
        try:
            reply = await handler(command)
        except Exception as error:
            emit({"error": repr(error)}, RESULT_PREFIX)
            continue
        reply["cpu_s"] = round(cpu_seconds_self(), 3)
        emit(reply, RESULT_PREFIX)
        if name == "stop":
            return


def run_command_tool(
    start: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, CommandHandler]]],
) -> None:
    """Run a helper that builds its command handlers with `start(options)`, then serves
    the commands until `stop`."""
    options = read_options()
    raise_open_file_limit()

    async def main() -> None:
        handlers = await start(options)
        await serve_commands(handlers)

    uvloop.run(main())
