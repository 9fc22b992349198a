"""Property-based fuzzing of every API operation from its OpenAPI schema (schemathesis).

The real `mensajero-api` process serves the requests, authenticated as a fresh user.
Every response must have a status below 500, and every error must be the documented
envelope `{"success": false, "error": <code>, "message": <text>}`. Schemathesis generates
both valid requests and ones that break the schema (wrong types, missing fields, odd
headers).

`make test` runs a few examples per operation with a fixed seed, well under a minute;
`make fuzz` sets MENSAJERO_FUZZ_EXAMPLES higher and MENSAJERO_FUZZ_SEED=random.
"""

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from service_processes import ProcessGroup, service_environment, wait_for_healthz
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.settings import Settings
from mensajero_common.testing import free_port, scaled

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = int(os.environ.get("MENSAJERO_FUZZ_EXAMPLES", "4"))
# A fixed seed keeps `make test` repeatable, and "random" draws a new one each run.
FUZZ_SEED = os.environ.get("MENSAJERO_FUZZ_SEED", "20261204")
PASSWORD = "fuzzing passphrase 2026"
REQUEST_TIMEOUT_S = 10.0
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


@dataclass
class FuzzTarget:
    url: str
    headers: dict[str, str]
    failures: list[str] = field(default_factory=list)
    calls: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


@pytest.fixture
async def fuzz_target(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: object,
    processes: ProcessGroup,
) -> AsyncIterator[FuzzTarget]:
    """Start the API alone, sign up a user and return its URL and bearer header."""
    port = free_port()
    env = service_environment(
        settings,
        API_HOST="127.0.0.1",
        API_PORT=port,
        RATE_LIMIT_ENABLED="false",
        LOG_LEVEL="WARNING",
    )
    api = await processes.start("api", ["mensajero-api"], env)
    url = f"http://127.0.0.1:{port}"
    email = f"fuzz-{uuid.uuid4().hex[:10]}@example.com"
    async with httpx.AsyncClient(base_url=url, timeout=scaled(10)) as client:
        await wait_for_healthz(client, url, api)
        signed_up = await client.post(
            "/api/v1/users/signup", json={"email": email, "password": PASSWORD}
        )
        assert signed_up.status_code == 201, signed_up.text
        login = await client.post(
            "/api/v1/login/access-token",
            data={"username": email, "password": PASSWORD},
        )
        assert login.status_code == 200, login.text
    yield FuzzTarget(url, {"Authorization": f"Bearer {login.json()['access_token']}"})


def _error_envelope_problem(response: requests.Response) -> str | None:
    """Describe how an error response breaks the envelope, or return None."""
    try:
        body: Any = response.json()
    except ValueError:
        return "error body is not JSON"
    if not isinstance(body, dict):
        return "error body is not a JSON object"
    if body.get("success") is not False:
        return "error body lacks success: false"
    if not isinstance(body.get("error"), str) or not body["error"]:
        return "error body lacks a machine code in 'error'"
    if not isinstance(body.get("message"), str) or not body["message"]:
        return "error body lacks a 'message'"
    return None


def _check(case: schemathesis.Case, response: requests.Response) -> None:
    label = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (
        f"{label} returned {response.status_code}: {response.text[:500]}\n"
        f"{case.as_curl_command()}"
    )
    if response.status_code >= 400:
        problem = _error_envelope_problem(response)
        assert problem is None, (
            f"{label} returned {response.status_code} outside the envelope "
            f"({problem}): {response.text[:500]}\n{case.as_curl_command()}"
        )


def _fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    target: FuzzTarget,
    session: requests.Session,
) -> None:
    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(case=operation.as_strategy(mode))
    def run(case: schemathesis.Case) -> None:
        if mode == schemathesis.GenerationMode.POSITIVE and case.headers:
            # Schemathesis fills the security schemes with random values, which would
            # make nearly every valid request a 401; negative runs keep them.
            case.headers.pop("X-API-Key", None)
            case.headers.pop("Authorization", None)
        try:
            response = case.call(
                base_url=target.url,
                session=session,
                headers=target.headers,
                timeout=REQUEST_TIMEOUT_S,
            )
        except (requests.exceptions.InvalidHeader, UnicodeEncodeError, ValueError):
            # The client library cannot put this value on the wire at all.
            return
        target.calls += 1
        target.statuses[response.status_code] += 1
        _check(case, response)

    seeded: Callable[[], None] = (
        run if FUZZ_SEED == "random" else seed(int(FUZZ_SEED))(run)
    )
    try:
        seeded()
    except Unsatisfiable:
        return
    except AssertionError as failure:
        target.failures.append(f"[{mode.value}] {failure}")


def _fuzz_all(target: FuzzTarget) -> int:
    raw_schema = requests.get(f"{target.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw_schema)
    operations = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            for mode in MODES:
                if mode == schemathesis.GenerationMode.NEGATIVE and not (
                    operation.path_parameters or operation.query or operation.body
                ):
                    # Nothing of the request can break its schema.
                    continue
                _fuzz_operation(operation, mode, target, session)
    return operations


async def test_fuzz_every_operation(fuzz_target: FuzzTarget) -> None:
    operations = await asyncio.to_thread(_fuzz_all, fuzz_target)
    print(
        f"fuzzing: {fuzz_target.calls} requests over {operations} operations, "
        f"by status: {dict(sorted(fuzz_target.statuses.items()))}"
    )

    assert operations > 20
    assert fuzz_target.calls > operations
    assert fuzz_target.failures == [], "\n\n".join(fuzz_target.failures)
