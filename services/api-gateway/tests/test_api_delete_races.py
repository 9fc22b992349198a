"""Requests that race with the deletion or revocation of the device, webhook or API key
they name.

Each test stops a request at a known point, with a row lock held in a transaction of its
own or with a patched call, makes the competing change, and then lets the request go
on. So the interleaving is the same on every run.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import pytest
from api_test_helpers import ApiUser, register_device, send_sms
from httpx import AsyncClient, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_common.models import SMSDevice, SMSMessage
from mensajero_common.testing import scaled

Sessions = async_sessionmaker[AsyncSession]

DEVICES_URL = "/api/v1/sms/devices"
WEBHOOKS_URL = "/api/v1/sms/webhooks"
API_KEYS_URL = "/api/v1/users/me/api-keys"


async def _lock_waiters(session_factory: Sessions) -> int:
    """Count the backends of the test database that wait for a lock."""
    async with session_factory() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(waiting or 0)


async def _wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    # Lock waits show only in pg_stat_activity, which has no change notification.
    async with asyncio.timeout(scaled(10)):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _wait_for_waiters(session_factory: Sessions, count: int) -> None:
    async def enough() -> bool:
        return await _lock_waiters(session_factory) >= count

    await _wait_until(enough)


async def _delete_row(session_factory: Sessions, table: str, row_id: str) -> None:
    async with session_factory() as session:
        await session.execute(
            text(f"DELETE FROM {table} WHERE id = :id"), {"id": uuid.UUID(row_id)}
        )
        await session.commit()


async def _send_while_device_is_deleted(
    client: AsyncClient,
    session_factory: Sessions,
    user: ApiUser,
    send: Callable[[str], Coroutine[Any, Any, Response]],
) -> Response:
    """Stop `send` at the quota charge, delete its device meanwhile, then let it go on.

    Returns the response to `send`, which gets the device's id.
    """
    device = await register_device(client, user)
    async with session_factory() as blocker:
        await blocker.execute(
            text("SELECT 1 FROM userquota WHERE user_id = :id FOR UPDATE"),
            {"id": user.id},
        )
        sending = asyncio.create_task(send(device["id"]))
        await _wait_for_waiters(session_factory, 1)

        deleting = asyncio.create_task(
            _delete_row(session_factory, "smsdevice", device["id"])
        )

        # The delete either ends at once or waits for the send.
        async def delete_ended_or_waits() -> bool:
            return deleting.done() or await _lock_waiters(session_factory) >= 2

        await _wait_until(delete_ended_or_waits)
        await blocker.rollback()

    response = await sending
    await deleting
    return response


async def test_send_survives_device_deleted_meanwhile(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    response = await _send_while_device_is_deleted(
        client,
        session_factory,
        user,
        lambda device_id: send_sms(client, user, device_id=device_id),
    )

    assert response.status_code == 201, response.text
    message_id = uuid.UUID(response.json()["data"]["message_id"])
    async with session_factory() as session:
        message = await session.get(SMSMessage, message_id)
    assert message is not None
    assert message.device_id is None


async def test_keyed_send_survives_device_deleted_meanwhile(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    response = await _send_while_device_is_deleted(
        client,
        session_factory,
        user,
        lambda device_id: send_sms(
            client, user, device_id=device_id, headers={"Idempotency-Key": "race-1"}
        ),
    )

    assert response.status_code == 201, response.text


async def test_bulk_survives_device_deleted_meanwhile(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    async def send_bulk(device_id: str) -> Response:
        return await client.post(
            "/api/v1/sms/send-bulk",
            json={
                "recipients": ["+525512345678", "+525512345679"],
                "body": "Hola",
                "device_id": device_id,
            },
            headers=user.headers,
        )

    response = await _send_while_device_is_deleted(
        client, session_factory, user, send_bulk
    )

    assert response.status_code == 201, response.text
    assert response.json()["data"]["accepted"] == 2


async def test_refused_keyed_send_to_deleted_device(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    device = await register_device(client, user)
    async with session_factory() as session:
        await session.execute(
            text("UPDATE userquota SET sms_sent_this_month = 5000 WHERE user_id = :id"),
            {"id": user.id},
        )
        await session.commit()

    async with session_factory() as holder:
        # An uncommitted message with the same key. With no SMS left, the send takes
        # its slower path, which inserts before charging and waits here for the key.
        await holder.execute(
            text(
                "INSERT INTO smsmessage (id, user_id, type, status, body, "
                "idempotency_key) VALUES (:id, :user_id, 'outgoing', 'pending', "
                "'Hola', 'race-2')"
            ),
            {"id": uuid.uuid4(), "user_id": user.id},
        )
        sending = asyncio.create_task(
            send_sms(
                client,
                user,
                device_id=device["id"],
                headers={"Idempotency-Key": "race-2"},
            )
        )
        await _wait_for_waiters(session_factory, 1)
        await _delete_row(session_factory, "smsdevice", device["id"])
        await holder.rollback()
    response = await sending

    assert response.status_code == 404, response.text
    assert response.json()["error"] == "device_not_found"


async def test_device_delete_and_send_do_not_deadlock(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    device = await register_device(client, user)
    earlier = await send_sms(client, user, device_id=device["id"])
    assert earlier.status_code == 201, earlier.text
    # Delivered, so the delete does not lock it before the device's row.
    async with session_factory() as session:
        await session.execute(
            text("UPDATE smsmessage SET status = 'delivered' WHERE id = :id"),
            {"id": uuid.UUID(earlier.json()["data"]["message_id"])},
        )
        await session.commit()

    async with session_factory() as blocker:
        # The delete sets device_id NULL on the earlier message, so it stops there with
        # the device's row locked.
        await blocker.execute(
            text("SELECT 1 FROM smsmessage WHERE id = :id FOR UPDATE"),
            {"id": uuid.UUID(earlier.json()["data"]["message_id"])},
        )
        deleting = asyncio.create_task(
            client.delete(f"{DEVICES_URL}/{device['id']}", headers=user.headers)
        )
        await _wait_for_waiters(session_factory, 1)
        sending = asyncio.create_task(send_sms(client, user, device_id=device["id"]))
        await _wait_for_waiters(session_factory, 2)
        await blocker.rollback()

    deleted = await deleting
    sent = await sending

    assert deleted.status_code == 200, deleted.text
    assert sent.status_code == 404, sent.text
    assert sent.json()["error"] == "device_not_found"


async def _change_while_deleted(
    session_factory: Sessions,
    table: str,
    row_id: str,
    change: Callable[[], Coroutine[Any, Any, Response]],
) -> Response:
    """Run `change` while another transaction locks the row, then delete the row in it."""
    async with session_factory() as blocker:
        await blocker.execute(
            text(f"SELECT 1 FROM {table} WHERE id = :id FOR UPDATE"),
            {"id": uuid.UUID(row_id)},
        )
        changing = asyncio.create_task(change())
        await _wait_for_waiters(session_factory, 1)
        await blocker.execute(
            text(f"DELETE FROM {table} WHERE id = :id"), {"id": uuid.UUID(row_id)}
        )
        await blocker.commit()
    return await changing


async def test_device_update_of_deleted_device(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    device = await register_device(client, user)

    response = await _change_while_deleted(
        session_factory,
        "smsdevice",
        device["id"],
        lambda: client.put(
            f"{DEVICES_URL}/{device['id']}", json={"name": "New"}, headers=user.headers
        ),
    )

    assert response.status_code == 404, response.text
    assert response.json()["error"] == "device_not_found"


async def test_key_rotation_of_deleted_device(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    device = await register_device(client, user)

    response = await _change_while_deleted(
        session_factory,
        "smsdevice",
        device["id"],
        lambda: client.post(
            f"{DEVICES_URL}/{device['id']}/rotate-key", json={}, headers=user.headers
        ),
    )

    assert response.status_code == 404, response.text
    assert response.json()["error"] == "device_not_found"


@pytest.mark.parametrize("change", ["update", "rotate-key"])
async def test_device_change_then_delete_before_reload(
    client: AsyncClient,
    session_factory: Sessions,
    user: ApiUser,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    device = await register_device(client, user)
    deletes: list[asyncio.Task[None]] = []
    refresh = AsyncSession.refresh

    async def delete_then_refresh(
        session: AsyncSession, instance: object, *args: Any, **kwargs: Any
    ) -> None:
        # The route reads the device back after writing it. A delete starts here and
        # either ends at once or waits for the route's transaction.
        if isinstance(instance, SMSDevice) and not deletes:
            deleting = asyncio.create_task(
                _delete_row(session_factory, "smsdevice", device["id"])
            )
            deletes.append(deleting)

            async def delete_ended_or_waits() -> bool:
                return deleting.done() or await _lock_waiters(session_factory) >= 1

            await _wait_until(delete_ended_or_waits)
        await refresh(session, instance, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "refresh", delete_then_refresh)
    if change == "update":
        response = await client.put(
            f"{DEVICES_URL}/{device['id']}", json={"name": "New"}, headers=user.headers
        )
    else:
        response = await client.post(
            f"{DEVICES_URL}/{device['id']}/rotate-key", json={}, headers=user.headers
        )
    await asyncio.gather(*deletes)

    assert len(deletes) == 1
    assert response.status_code == 200, response.text


async def test_webhook_update_of_deleted_webhook(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    created = await client.post(
        WEBHOOKS_URL, json={"url": "http://127.0.0.1:9/hook"}, headers=user.headers
    )
    assert created.status_code == 201, created.text
    webhook_id = created.json()["data"]["id"]

    response = await _change_while_deleted(
        session_factory,
        "webhookconfig",
        webhook_id,
        lambda: client.put(
            f"{WEBHOOKS_URL}/{webhook_id}",
            json={"url": "http://127.0.0.1:9/other"},
            headers=user.headers,
        ),
    )

    assert response.status_code == 404, response.text
    assert response.json()["error"] == "webhook_not_found"


async def test_concurrent_revoke_keeps_first_time(
    client: AsyncClient, session_factory: Sessions, user: ApiUser
) -> None:
    created = await client.post(API_KEYS_URL, json={"name": "ci"}, headers=user.headers)
    assert created.status_code == 201, created.text
    key: dict[str, Any] = created.json()["data"]

    async with session_factory() as first:
        # A revocation that has written its time and not committed yet.
        first_time = await first.scalar(
            text(
                "UPDATE userapikey SET revoked_at = now() - interval '1 minute' "
                "WHERE id = :id RETURNING revoked_at"
            ),
            {"id": uuid.UUID(key["id"])},
        )
        revoking = asyncio.create_task(
            client.delete(f"{API_KEYS_URL}/{key['id']}", headers=user.headers)
        )
        await _wait_for_waiters(session_factory, 1)
        await first.commit()
    response = await revoking

    assert response.status_code == 200, response.text
    async with session_factory() as session:
        stored = await session.scalar(
            text("SELECT revoked_at FROM userapikey WHERE id = :id"),
            {"id": uuid.UUID(key["id"])},
        )
    assert stored == first_time
    response_revoked_at = datetime.fromisoformat(response.json()["data"]["revoked_at"])
    assert response_revoked_at == first_time
