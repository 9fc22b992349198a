import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from api_test_helpers import ApiUser, MakeUser, count_rows, register_device, send_sms
from httpx import AsyncClient
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.envelope import QuotaErrorBody
from mensajero_api.quotas.service import device_quota_exceeded
from mensajero_common.models import SMSDevice, SMSMessage, User, UserPlan, UserQuota
from mensajero_common.quota_period import current_period_start, next_quota_reset
from mensajero_common.settings import Settings

PLANS_URL = "/api/v1/sms/plans"
QUOTA_URL = "/api/v1/sms/quota"
UPGRADE_URL = "/api/v1/sms/quota/upgrade"
DEVICES_URL = "/api/v1/sms/devices"

SessionFactory = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Bursts of parallel requests below must meet the quota, not the request rate limit.
    return settings.model_copy(update={"RATE_LIMIT_ENABLED": False})


async def _set_quota(
    session_factory: SessionFactory, user: ApiUser, **values: Any
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(UserQuota).where(UserQuota.user_id == user.id).values(**values)
        )
        await session.commit()


async def _quota_row(session_factory: SessionFactory, user: ApiUser) -> UserQuota:
    async with session_factory() as session:
        quota = await session.scalar(
            select(UserQuota).where(UserQuota.user_id == user.id)
        )
    assert quota is not None
    return quota


async def _make_superuser(
    make_user: MakeUser, session_factory: SessionFactory
) -> ApiUser:
    admin = await make_user()
    async with session_factory() as session:
        await session.execute(
            update(User).where(User.id == admin.id).values(is_superuser=True)
        )
        await session.commit()
    return admin


def _previous_period_day(settings: Settings) -> date:
    """A date in the month before the current quota period."""
    return current_period_start(
        datetime.now(UTC), settings.QUOTA_RESET_DAY
    ) - timedelta(days=1)


async def _read_quota(client: AsyncClient, user: ApiUser) -> dict[str, Any]:
    response = await client.get(QUOTA_URL, headers=user.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_list_plans(client: AsyncClient, make_user: MakeUser) -> None:
    owner = await make_user(plan="basic")

    response = await client.get(PLANS_URL, headers=owner.headers)

    assert response.status_code == 200, response.text
    assert response.json()["data"]["items"] == [
        {
            "code": "free",
            "name": "Free",
            "max_sms_per_month": 50,
            "max_devices": 1,
            "price": "0.00",
            "current": False,
        },
        {
            "code": "basic",
            "name": "Basic",
            "max_sms_per_month": 500,
            "max_devices": 3,
            "price": "9.99",
            "current": True,
        },
        {
            "code": "pro",
            "name": "Pro",
            "max_sms_per_month": 5000,
            "max_devices": 10,
            "price": "29.99",
            "current": False,
        },
        {
            "code": "enterprise",
            "name": "Enterprise",
            "max_sms_per_month": 999999,
            "max_devices": 999,
            "price": "99.99",
            "current": False,
        },
    ]


async def test_list_plans_hides_inactive(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user()
    async with session_factory() as session:
        await session.execute(
            update(UserPlan).where(UserPlan.code == "basic").values(is_active=False)
        )
        await session.commit()

    try:
        response = await client.get(PLANS_URL, headers=owner.headers)
    finally:
        async with session_factory() as session:
            await session.execute(
                update(UserPlan).where(UserPlan.code == "basic").values(is_active=True)
            )
            await session.commit()

    codes = [plan["code"] for plan in response.json()["data"]["items"]]
    assert codes == ["free", "pro", "enterprise"]


async def test_plans_need_login(client: AsyncClient) -> None:
    response = await client.get(PLANS_URL)

    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


async def test_quota_fields(
    client: AsyncClient, make_user: MakeUser, settings: Settings
) -> None:
    owner = await make_user(plan="free")

    data = await _read_quota(client, owner)

    reset_at = next_quota_reset(datetime.now(UTC), settings.QUOTA_RESET_DAY)
    assert data == {
        "user_id": str(owner.id),
        "plan": "Free",
        "plan_code": "free",
        "sms_sent_this_month": 0,
        "max_sms_per_month": 50,
        "sms_available": 50,
        "devices_registered": 0,
        "max_devices": 1,
        "devices_available": 1,
        "last_reset_date": datetime.now(UTC).date().isoformat(),
        "reset_date": reset_at.date().isoformat(),
        "reset_at": reset_at.isoformat().replace("+00:00", "Z"),
    }


async def test_quota_counts_messages_not_segments(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="free")
    long_body = "x" * 400

    sent = await send_sms(client, owner, body=long_body)
    await send_sms(client, owner, body="short")

    assert sent.status_code == 201, sent.text
    assert sent.json()["data"]["segments"] == 3
    data = await _read_quota(client, owner)
    assert data["sms_sent_this_month"] == 2
    assert data["sms_available"] == 48


async def test_quota_tracks_device_slots(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="basic")
    first = await register_device(client, owner, name="One")
    await register_device(client, owner, name="Two")

    registered = await _read_quota(client, owner)
    await client.delete(f"{DEVICES_URL}/{first['device_id']}", headers=owner.headers)
    after_delete = await _read_quota(client, owner)

    assert registered["devices_registered"] == 2
    assert registered["devices_available"] == 1
    assert after_delete["devices_registered"] == 1
    assert after_delete["devices_available"] == 2


async def test_device_limit_edge(client: AsyncClient, make_user: MakeUser) -> None:
    owner = await make_user(plan="basic")
    for name in ("One", "Two", "Three"):
        await register_device(client, owner, name=name)

    fourth = await client.post(
        DEVICES_URL,
        json={"name": "Four"},
        headers={**owner.headers, "Accept-Language": "en"},
    )

    assert fourth.status_code == 429
    body = fourth.json()
    assert body["message"] == (
        "Your plan allows 3 devices and all of them are registered. Delete one you no "
        "longer use (DELETE /api/v1/sms/devices/<id>) or ask the administrator of "
        "this Mensajero server for a plan with more devices (plans are listed at "
        "/api/v1/sms/plans)."
    )
    assert (body["limit"], body["used"], body["available"]) == (3, 3, 0)


@pytest.mark.parametrize(
    ("language", "message"),
    [
        (
            "es",
            "Tu plan permite 1 dispositivo y tienes 3 registrados, más de los que "
            "permite (por ejemplo, tras pasar a un plan menor). Para registrar otro, "
            "elimina 3 que ya no uses (DELETE /api/v1/sms/devices/<id>) o pide al "
            "administrador de este servidor Mensajero un plan con más dispositivos "
            "(los planes están en /api/v1/sms/plans).",
        ),
        (
            "en",
            "Your plan allows 1 device and you have 3 registered, more than it allows "
            "(after a move to a smaller plan, for example). To register another, "
            "delete 3 you no longer use (DELETE /api/v1/sms/devices/<id>) or ask the "
            "administrator of this Mensajero server for a plan with more devices "
            "(plans are listed at /api/v1/sms/plans).",
        ),
    ],
)
async def test_device_limit_after_downgrade(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: SessionFactory,
    language: str,
    message: str,
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user(plan="basic")
    for name in ("One", "Two", "Three"):
        await register_device(client, owner, name=name)
    downgraded = await client.put(
        UPGRADE_URL,
        json={"user_id": str(owner.id), "plan": "free"},
        headers=admin.headers,
    )

    refused = await client.post(
        DEVICES_URL,
        json={"name": "Four"},
        headers={**owner.headers, "Accept-Language": language},
    )

    assert downgraded.status_code == 200, downgraded.text
    assert refused.status_code == 429
    body = refused.json()
    assert body["message"] == message
    assert (body["limit"], body["used"], body["available"]) == (1, 3, 0)


@pytest.mark.parametrize(
    ("limit", "used", "message"),
    [
        (3, 3, "Your plan allows 3 devices and all of them are registered."),
        (1, 1, "Your plan allows 1 device and it is already registered."),
        (2, 3, "Your plan allows 2 devices and you have 3 registered,"),
        (0, 0, "Your plan allows no devices."),
        (0, 2, "Your plan allows no devices."),
    ],
)
def test_device_quota_message_per_count(limit: int, used: int, message: str) -> None:
    error = device_quota_exceeded(
        UserQuota(devices_registered=used), UserPlan(max_devices=limit)
    )

    assert error.message("en").startswith(message)


async def test_sms_limit_edge(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(session_factory, owner, sms_sent_this_month=49)

    last_allowed = await send_sms(client, owner, body="last")
    first_refused = await send_sms(client, owner, body="one too many")

    assert last_allowed.status_code == 201, last_allowed.text
    assert first_refused.status_code == 429
    assert first_refused.json()["available"] == 0
    assert (await _quota_row(session_factory, owner)).sms_sent_this_month == 50


@pytest.mark.parametrize(
    ("language", "message"),
    [
        (
            "es",
            "Tu plan permite 50 SMS al mes y ya los has enviado todos. Podrás enviar "
            "más desde el {reset_date} a las 00:00 UTC. Para enviar antes, pide al "
            "administrador de este servidor Mensajero un plan mayor (los planes están "
            "en /api/v1/sms/plans).",
        ),
        (
            "en",
            "Your plan allows 50 SMS a month and you have sent them all. You can send "
            "more from {reset_date} at 00:00 UTC. To send sooner, ask the "
            "administrator of this Mensajero server for a larger plan (plans are "
            "listed at /api/v1/sms/plans).",
        ),
    ],
)
async def test_sms_limit_message_languages(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: SessionFactory,
    language: str,
    message: str,
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(session_factory, owner, sms_sent_this_month=50)

    response = await send_sms(client, owner, headers={"Accept-Language": language})

    assert response.status_code == 429
    assert response.headers["content-language"] == language
    QuotaErrorBody.model_validate(response.json())
    reset_date = response.json()["reset_date"]
    assert response.json()["message"] == message.format(reset_date=reset_date)


async def test_parallel_sends_one_left_refuse_rest(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(session_factory, owner, sms_sent_this_month=49)

    responses = await asyncio.gather(
        *(send_sms(client, owner, body=f"message {n}") for n in range(50))
    )

    accepted = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) == 1
    assert len(refused) == 49
    assert {r.json()["error"] for r in refused} == {"quota_exceeded"}
    assert await count_rows(session_factory, SMSMessage, user_id=owner.id) == 1
    assert (await _quota_row(session_factory, owner)).sms_sent_this_month == 50


async def test_parallel_registrations_one_slot_left(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    owner = await make_user(plan="basic")
    await register_device(client, owner, name="One")
    await register_device(client, owner, name="Two")

    responses = await asyncio.gather(
        *(
            client.post(DEVICES_URL, json={"name": f"Phone {n}"}, headers=owner.headers)
            for n in range(10)
        )
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [201] + [429] * 9
    assert await count_rows(session_factory, SMSDevice, user_id=owner.id) == 3
    assert (await _quota_row(session_factory, owner)).devices_registered == 3


async def test_lazy_reset_on_read(
    client: AsyncClient,
    make_user: MakeUser,
    settings: Settings,
    session_factory: SessionFactory,
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(
        session_factory,
        owner,
        sms_sent_this_month=50,
        last_reset_date=_previous_period_day(settings),
    )

    data = await _read_quota(client, owner)

    today = datetime.now(UTC).date()
    assert data["sms_sent_this_month"] == 0
    assert data["last_reset_date"] == today.isoformat()
    stored = await _quota_row(session_factory, owner)
    assert (stored.sms_sent_this_month, stored.last_reset_date) == (0, today)


async def test_lazy_reset_on_charge(
    client: AsyncClient,
    make_user: MakeUser,
    settings: Settings,
    session_factory: SessionFactory,
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(
        session_factory,
        owner,
        sms_sent_this_month=50,
        last_reset_date=_previous_period_day(settings),
    )

    response = await send_sms(client, owner)

    assert response.status_code == 201, response.text
    stored = await _quota_row(session_factory, owner)
    assert stored.sms_sent_this_month == 1
    assert stored.last_reset_date == datetime.now(UTC).date()


async def test_lazy_reset_under_parallel_sends(
    client: AsyncClient,
    make_user: MakeUser,
    settings: Settings,
    session_factory: SessionFactory,
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(
        session_factory,
        owner,
        sms_sent_this_month=50,
        last_reset_date=_previous_period_day(settings),
    )

    responses = await asyncio.gather(
        *(send_sms(client, owner, body=f"message {n}") for n in range(55))
    )

    codes = [response.status_code for response in responses]
    assert codes.count(201) == 50
    assert codes.count(429) == 5
    assert (await _quota_row(session_factory, owner)).sms_sent_this_month == 50


async def test_refusal_counts_after_lazy_reset(
    client: AsyncClient,
    make_user: MakeUser,
    settings: Settings,
    session_factory: SessionFactory,
) -> None:
    owner = await make_user(plan="free")
    await _set_quota(
        session_factory,
        owner,
        sms_sent_this_month=50,
        last_reset_date=_previous_period_day(settings),
    )
    recipients = [f"+5255123456{n:02d}" for n in range(51)]

    response = await client.post(
        "/api/v1/sms/send-bulk",
        json={"recipients": recipients, "body": "Hola"},
        headers=owner.headers,
    )

    assert response.status_code == 429
    assert (response.json()["used"], response.json()["available"]) == (0, 50)


async def test_upgrade_by_superuser(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user(plan="free")
    await _set_quota(session_factory, owner, sms_sent_this_month=50)

    response = await client.put(
        UPGRADE_URL,
        json={"user_id": str(owner.id), "plan": "pro"},
        headers={**admin.headers, "Accept-Language": "en"},
    )

    assert response.status_code == 200, response.text
    assert response.json()["message"] == "Plan changed to Pro."
    data = response.json()["data"]
    assert data["user_id"] == str(owner.id)
    assert (data["plan"], data["plan_code"]) == ("Pro", "pro")
    assert data["sms_sent_this_month"] == 50
    assert data["max_sms_per_month"] == 5000
    assert (await _read_quota(client, owner))["plan"] == "Pro"
    assert (await send_sms(client, owner)).status_code == 201


async def test_upgrade_by_email_and_plan_in_any_case(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user(plan="free")

    response = await client.put(
        UPGRADE_URL,
        json={"email": owner.email.upper(), "plan": "Pro"},
        headers=admin.headers,
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["user_id"] == str(owner.id)
    assert response.json()["data"]["plan_code"] == "pro"
    assert (await _read_quota(client, owner))["plan_code"] == "pro"


async def test_upgrade_by_email_compatibility_form(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user("k955537@example.com", plan="free")

    response = await client.put(
        UPGRADE_URL,
        json={"email": "ｋ955537@example.com", "plan": "pro"},
        headers=admin.headers,
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["user_id"] == str(owner.id)


async def test_upgrade_target_errors(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user(plan="free")
    english = {**admin.headers, "Accept-Language": "en"}

    both = await client.put(
        UPGRADE_URL,
        json={"user_id": str(owner.id), "email": owner.email, "plan": "pro"},
        headers=english,
    )
    unknown = await client.put(
        UPGRADE_URL, json={"email": "nadie@example.com", "plan": "pro"}, headers=english
    )

    assert both.status_code == 400
    assert both.json()["error"] == "user_id_and_email"
    assert both.json()["message"] == "Name the user by user_id or by email, not both."
    assert unknown.status_code == 404
    assert unknown.json() == {
        "success": False,
        "error": "user_not_found",
        "message": "No user has the email nadie@example.com.",
        "email": "nadie@example.com",
    }
    assert (await _read_quota(client, owner))["plan_code"] == "free"


async def test_upgrade_without_user_id_changes_caller(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)

    response = await client.put(
        UPGRADE_URL, json={"plan": "enterprise"}, headers=admin.headers
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["user_id"] == str(admin.id)
    assert response.json()["data"]["plan"] == "Enterprise"


async def test_upgrade_by_normal_user_forbidden(
    client: AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(plan="free")

    for body in ({"plan": "enterprise"}, {"user_id": str(owner.id), "plan": "pro"}):
        response = await client.put(UPGRADE_URL, json=body, headers=owner.headers)
        assert response.status_code == 403
        assert response.json()["error"] == "superuser_required"
    assert (await _read_quota(client, owner))["plan_code"] == "free"


async def test_upgrade_unknown_plan(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)

    response = await client.put(
        UPGRADE_URL, json={"plan": "platinum"}, headers=admin.headers
    )

    assert response.status_code == 404
    assert response.json() == {
        "success": False,
        "error": "plan_not_found",
        "message": "No existe el plan platinum. Planes disponibles: free, basic, pro, enterprise.",
        "plan": "platinum",
        "available": ["free", "basic", "pro", "enterprise"],
    }


@pytest.mark.parametrize(
    ("plan", "error_type"),
    [("pro\x00", "string_contains_nul"), ("pro\ud800", "string_unicode")],
)
async def test_upgrade_plan_unstorable_character(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: SessionFactory,
    plan: str,
    error_type: str,
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user()

    # httpx's json= fails on a lone surrogate, and json.dumps escapes it as \ud800.
    response = await client.put(
        UPGRADE_URL,
        content=json.dumps({"user_id": str(owner.id), "plan": plan}),
        headers={**admin.headers, "Content-Type": "application/json"},
    )

    assert response.status_code == 422, response.text
    item = response.json()["details"][0]
    assert item["field"] == "plan"
    assert item["type"] == error_type
    assert (await _read_quota(client, owner))["plan_code"] == "free"


async def test_upgrade_unknown_user(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    missing = "00000000-0000-4000-8000-000000000000"

    response = await client.put(
        UPGRADE_URL, json={"user_id": missing, "plan": "pro"}, headers=admin.headers
    )

    assert response.status_code == 404
    assert response.json()["error"] == "user_not_found"
    assert response.json()["user_id"] == missing


async def test_upgrade_requires_plan(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)

    response = await client.put(UPGRADE_URL, json={}, headers=admin.headers)

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "plan"


async def test_downgrade_keeps_usage(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user(plan="pro")
    await _set_quota(session_factory, owner, sms_sent_this_month=120)
    await register_device(client, owner, name="One")
    await register_device(client, owner, name="Two")

    response = await client.put(
        UPGRADE_URL,
        json={"user_id": str(owner.id), "plan": "free"},
        headers=admin.headers,
    )
    refused_send = await send_sms(client, owner)
    refused_device = await client.post(
        DEVICES_URL, json={"name": "Three"}, headers=owner.headers
    )

    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["sms_sent_this_month"], data["sms_available"]) == (120, 0)
    assert (data["devices_registered"], data["devices_available"]) == (2, 0)
    assert refused_send.status_code == 429
    assert refused_send.json()["used"] == 120
    assert refused_device.status_code == 429
    assert refused_device.json()["quota_type"] == "devices"


async def test_upgrade_creates_missing_quota(
    client: AsyncClient, make_user: MakeUser, session_factory: SessionFactory
) -> None:
    admin = await _make_superuser(make_user, session_factory)
    owner = await make_user(plan="free")
    async with session_factory() as session:
        quota = await session.scalar(
            select(UserQuota).where(UserQuota.user_id == owner.id)
        )
        await session.delete(quota)
        await session.commit()

    response = await client.put(
        UPGRADE_URL,
        json={"user_id": str(owner.id), "plan": "basic"},
        headers=admin.headers,
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["plan_code"] == "basic"
    assert response.json()["data"]["sms_sent_this_month"] == 0
