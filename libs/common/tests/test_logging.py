"""What the shared logging setup lets through."""

import logging
from collections.abc import Iterator

import pytest
import structlog

from mensajero_common.logging import configure_logging
from mensajero_common.settings import Settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_httpx_request_lines_are_not_logged(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(settings.model_copy(update={"LOG_LEVEL": "DEBUG"}), "test")

    # What httpx logs for every request, with a receiver's token in the URL.
    logging.getLogger("httpx").info(
        'HTTP Request: POST https://hooks.example.com/in?token=s3cr3t "HTTP/1.1 200 OK"'
    )
    logging.getLogger("httpx").warning("a warning of httpx")
    structlog.get_logger("test").debug("a debug line of ours")

    output = capsys.readouterr().err
    assert "s3cr3t" not in output
    assert "a warning of httpx" in output
    assert "a debug line of ours" in output


@pytest.mark.parametrize("name", ["api_key", "api%5Fkey", "API%5fKEY"])
@pytest.mark.usefixtures("restore_logging")
def test_handshake_lines_hide_device_keys(
    settings: Settings, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    configure_logging(settings, "test")

    # What uvicorn logs for a refused WebSocket handshake. Starlette decodes the name of
    # a query parameter, so an encoded `_` authenticates as well.
    logging.getLogger("uvicorn.error").info(
        '%s - "WebSocket %s" %d',
        "127.0.0.1:50000",
        f"/api/v1/android/ws?{name}=mdk_s3cr3t&x=1",
        403,
    )

    output = capsys.readouterr().err
    assert "mdk_s3cr3t" not in output
    assert f"{name}=[redacted]&x=1" in output
