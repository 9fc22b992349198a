import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from api_test_helpers import ApiUser, MakeUser
from httpx import ASGITransport, AsyncClient
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.auth.security import create_access_token
from mensajero_api.main import create_app
from mensajero_common.models import User, UserPlan, UserQuota
from mensajero_common.settings import Settings
from mensajero_common.validation_messages import VALIDATION_MESSAGES

SIGNUP_URL = "/api/v1/users/signup"
LOGIN_URL = "/api/v1/login/access-token"
ME_URL = "/api/v1/users/me"

SessionFactory = async_sessionmaker[AsyncSession]


async def test_signup_login_and_me(
    client: AsyncClient, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    signup = await client.post(
        SIGNUP_URL,
        json={
            "email": "Ana@Example.com",
            "password": "s3cret-pass",
            "full_name": "Ana",
            "default_region": "mx",
        },
    )
    assert signup.status_code == 201, signup.text
    body = signup.json()
    assert body["success"] is True
    assert body["message"] == "Cuenta creada."
    assert body["data"]["email"] == "Ana@example.com"
    assert body["data"]["default_region"] == "MX"
    assert body["data"]["is_superuser"] is False
    assert "hashed_password" not in body["data"]

    login = await client.post(
        LOGIN_URL, data={"username": "ana@EXAMPLE.com", "password": "s3cret-pass"}
    )
    assert login.status_code == 200, login.text
    token = login.json()
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 24 * 60 * 60
    assert "success" not in token

    me = await client.get(
        ME_URL, headers={"Authorization": f"Bearer {token['access_token']}"}
    )
    assert me.status_code == 200
    assert me.json()["data"]["id"] == body["data"]["id"]

    async with session_factory() as session:
        row = (
            await session.execute(
                select(
                    User.hashed_password, UserQuota.sms_sent_this_month, UserPlan.code
                )
                .join(UserQuota, UserQuota.user_id == User.id)
                .join(UserPlan, UserPlan.id == UserQuota.plan_id)
                .where(User.id == body["data"]["id"])
            )
        ).one()
    assert row.hashed_password.startswith("$argon2id$")
    assert row.sms_sent_this_month == 0
    assert row.code == "free"


async def test_signup_duplicate_email_any_case(
    client: AsyncClient, make_user: MakeUser
) -> None:
    await make_user("maria@example.com")

    response = await client.post(
        SIGNUP_URL, json={"email": "MARIA@example.com", "password": "another-pass"}
    )

    assert response.status_code == 409
    body = response.json()
    assert body["success"] is False
    assert body["error"] == "email_taken"
    assert body["email"] == "MARIA@example.com"


@pytest.mark.parametrize(
    "email",
    [
        # Fullwidth "ｋ" (U+FF4B), fullwidth "＠" (U+FF20) and the Kelvin sign (U+212A).
        "ｋ955537@example.com",
        "k955537＠example.com",
        "\u212a955537@example.com",
    ],
)
async def test_signup_duplicate_email_compatibility_form(
    client: AsyncClient,
    make_user: MakeUser,
    session_factory: SessionFactory,
    email: str,
) -> None:
    await make_user("k955537@example.com")

    response = await client.post(
        SIGNUP_URL, json={"email": email, "password": "another-pass"}
    )

    assert response.status_code == 409, response.text
    assert response.json()["error"] == "email_taken"
    async with session_factory() as session:
        emails = (
            await session.scalars(select(User.email).where(User.email.like("%955537%")))
        ).all()
    assert emails == ["k955537@example.com"]


async def test_signup_stores_email_in_nfkc(client: AsyncClient) -> None:
    signup = await client.post(
        SIGNUP_URL, json={"email": "ｋ955537@ｅxample.com", "password": "s3cret-pass"}
    )

    logins = [
        await client.post(
            LOGIN_URL, data={"username": username, "password": "s3cret-pass"}
        )
        for username in (
            "k955537@example.com",
            "ｋ955537@example.com",
            "K955537@example.com",
        )
    ]

    assert signup.status_code == 201, signup.text
    assert signup.json()["data"]["email"] == "k955537@example.com"
    assert [login.status_code for login in logins] == [200, 200, 200]


async def test_signup_validation_errors(client: AsyncClient) -> None:
    response = await client.post(
        SIGNUP_URL, json={"email": "not-an-email", "password": "pw1234"}
    )

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_error"
    assert {item["field"] for item in body["details"]} == {"email", "password"}
    assert all(item["location"] == "body" for item in body["details"])
    assert "pw1234" not in response.text


async def test_signup_invalid_region(client: AsyncClient) -> None:
    response = await client.post(
        SIGNUP_URL,
        json={
            "email": "r@example.com",
            "password": "long-enough",
            "default_region": "XX",
        },
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_region"
    assert response.json()["region"] == "XX"


@pytest.mark.parametrize(
    "username",
    [
        # As typed at sign-up: spaces around it and the domain in its IDNA (xn--) form.
        " zoe@xn--exmple-cua.com ",
        "zoe@exämple.com",
        # "ä" as "a" and a combining diaeresis (NFD), which sign-up stores as NFC.
        "zoe@exa\u0308mple.com",
        "ZOE@EXÄMPLE.COM",
    ],
)
async def test_login_email_normalized_as_signup(
    client: AsyncClient, username: str
) -> None:
    signup = await client.post(
        SIGNUP_URL,
        json={"email": " zoe@xn--exmple-cua.com ", "password": "s3cret-pass"},
    )

    login = await client.post(
        LOGIN_URL, data={"username": username, "password": "s3cret-pass"}
    )

    assert signup.status_code == 201, signup.text
    assert signup.json()["data"]["email"] == "zoe@exämple.com"
    assert login.status_code == 200, login.text


async def test_login_compatibility_form(client: AsyncClient, user: ApiUser) -> None:
    local_part, _, domain = user.email.partition("@")
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in local_part) + "@" + domain

    login = await client.post(
        LOGIN_URL, data={"username": fullwidth, "password": user.password}
    )

    assert login.status_code == 200, login.text


async def _logged_in_user_id(client: AsyncClient, username: str, password: str) -> str:
    login = await client.post(
        LOGIN_URL, data={"username": username, "password": password}
    )
    assert login.status_code == 200, (username, login.text)
    token = login.json()["access_token"]
    me = await client.get(ME_URL, headers={"Authorization": f"Bearer {token}"})
    user_id: str = me.json()["data"]["id"]
    return user_id


async def test_login_keeps_pre_nfkc_account(
    client: AsyncClient, make_user: MakeUser
) -> None:
    # Both rows as sign-up stored them before it applied NFKC, which migration 0016
    # keeps when the NFKC form is another account's.
    plain = await make_user("k955537@example.com")
    fullwidth = await make_user("ｋ955537@example.com")

    assert await _logged_in_user_id(
        client, "ｋ955537@example.com", fullwidth.password
    ) == str(fullwidth.id)
    assert await _logged_in_user_id(
        client, "k955537@example.com", plain.password
    ) == str(plain.id)
    assert await _logged_in_user_id(
        client, "K955537@example.com", plain.password
    ) == str(plain.id)


async def test_login_wrong_password(client: AsyncClient, user: ApiUser) -> None:
    response = await client.post(
        LOGIN_URL, data={"username": user.email, "password": "wrong-password"}
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_credentials"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_login_as_json_names_form(client: AsyncClient, user: ApiUser) -> None:
    credentials = {"username": user.email, "password": user.password}

    spanish = await client.post(LOGIN_URL, json=credentials)
    english = await client.post(
        LOGIN_URL,
        content=json.dumps(credentials),
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Accept-Language": "en",
        },
    )

    assert spanish.status_code == 415
    assert spanish.json()["error"] == "login_form_required"
    assert "formulario" in spanish.json()["message"]
    assert english.status_code == 415
    assert "as a form" in english.json()["message"]


async def test_login_unknown_email(client: AsyncClient) -> None:
    response = await client.post(
        LOGIN_URL, data={"username": "nobody@example.com", "password": "whatever1"}
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_credentials"


async def test_login_disabled_user(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(User).where(User.id == user.id).values(is_active=False)
        )
        await session.commit()

    login = await client.post(
        LOGIN_URL, data={"username": user.email, "password": user.password}
    )
    me = await client.get(ME_URL, headers=user.headers)

    assert login.status_code == 403
    assert login.json()["error"] == "inactive_user"
    assert login.json()["message"] == (
        "La cuenta está desactivada. Pide al administrador de este servidor "
        "Mensajero que la active."
    )
    assert me.status_code == 403
    assert me.json()["error"] == "inactive_user"


async def test_me_without_token(client: AsyncClient) -> None:
    response = await client.get(ME_URL)

    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_me_expired_token(
    client: AsyncClient, user: ApiUser, settings: Settings
) -> None:
    issued = datetime.now(UTC) - timedelta(
        minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES + 1
    )
    token = create_access_token(user.id, 0, settings, now=issued).token

    response = await client.get(ME_URL, headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_me_forged_token(client: AsyncClient, user: ApiUser) -> None:
    forged = jwt.encode(
        {"sub": str(user.id), "ver": 0, "exp": datetime.now(UTC) + timedelta(hours=1)},
        "another-secret-key-of-an-attacker-32-bytes",
        algorithm="HS256",
    )
    unsigned = jwt.encode(
        {"sub": str(user.id), "ver": 0, "exp": datetime.now(UTC) + timedelta(hours=1)},
        None,
        algorithm="none",
    )

    for token in (forged, unsigned, "not-a-jwt", user.token + "x"):
        response = await client.get(
            ME_URL, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 401, token
        assert response.json()["error"] == "invalid_token"
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_me_token_of_older_version(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        await session.execute(
            update(User).where(User.id == user.id).values(token_version=1)
        )
        await session.commit()

    response = await client.get(ME_URL, headers=user.headers)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


async def test_update_me(client: AsyncClient, user: ApiUser) -> None:
    response = await client.patch(
        ME_URL,
        json={"full_name": "  Luis  ", "default_region": "es"},
        headers={**user.headers, "Accept-Language": "en"},
    )

    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["full_name"] == "Luis"
    assert data["default_region"] == "ES"
    assert response.json()["message"] == "Profile updated."

    cleared = await client.patch(
        ME_URL, json={"default_region": None}, headers=user.headers
    )
    assert cleared.json()["data"]["default_region"] is None
    assert cleared.json()["data"]["full_name"] == "Luis"


@pytest.mark.parametrize(
    ("region", "error_type"),
    [("M\x00X", "string_contains_nul"), ("\ud800", "string_unpaired_surrogate")],
)
async def test_region_unstorable_character(
    client: AsyncClient, user: ApiUser, region: str, error_type: str
) -> None:
    # httpx's json= fails on a lone surrogate, and json.dumps escapes it as \ud800.
    json_type = {"Content-Type": "application/json"}
    signup_body = {
        "email": "surrogate@example.com",
        "password": "long-enough",
        "default_region": region,
    }
    signup = await client.post(
        SIGNUP_URL, content=json.dumps(signup_body), headers=json_type
    )
    update_me = await client.patch(
        ME_URL,
        content=json.dumps({"default_region": region}),
        headers={**user.headers, **json_type},
    )

    for response in (signup, update_me):
        assert response.status_code == 422, response.text
        item = response.json()["details"][0]
        assert item["field"] == "default_region"
        assert item["type"] == error_type
    me = await client.get(ME_URL, headers=user.headers)
    assert me.json()["data"]["default_region"] is None


async def test_update_me_invalid_region(client: AsyncClient, user: ApiUser) -> None:
    response = await client.patch(
        ME_URL, json={"default_region": "Mexico"}, headers=user.headers
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_region"


@pytest.mark.parametrize(
    "full_name",
    [
        "a\nb",
        "\u0007bell",
        "\u2066iso\u2069",
        "\u202egnp.exe",
        "Ana\x9b",
        "x\u2028y",
        "\u200fAna",
    ],
)
async def test_full_name_rejects_control_characters(
    client: AsyncClient,
    user: ApiUser,
    session_factory: async_sessionmaker[AsyncSession],
    full_name: str,
) -> None:
    signup = await client.post(
        SIGNUP_URL,
        json={
            "email": "control@example.com",
            "password": "long-enough",
            "full_name": full_name,
        },
    )
    updated = await client.patch(
        ME_URL, json={"full_name": full_name}, headers=user.headers
    )

    expected = [
        {
            "field": "full_name",
            "location": "body",
            "message": VALIDATION_MESSAGES["string_contains_control"]["es"],
            "type": "string_contains_control",
        }
    ]
    for response in (signup, updated):
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
        assert response.json()["details"] == expected
    async with session_factory() as session:
        signed_up = await session.scalar(
            select(User.id).where(User.email == "control@example.com")
        )
        stored_name = await session.scalar(
            select(User.full_name).where(User.id == user.id)
        )
    assert signed_up is None
    assert stored_name != full_name


async def test_first_superuser_created_at_start(
    client: AsyncClient,
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        row = (
            await session.execute(
                select(User.is_superuser, UserPlan.code)
                .join(UserQuota, UserQuota.user_id == User.id)
                .join(UserPlan, UserPlan.id == UserQuota.plan_id)
                .where(User.email == settings.FIRST_SUPERUSER)
            )
        ).one()
    assert row.is_superuser is True
    assert row.code == "free"

    login = await client.post(
        LOGIN_URL,
        data={
            "username": settings.FIRST_SUPERUSER,
            "password": settings.FIRST_SUPERUSER_PASSWORD,
        },
    )
    assert login.status_code == 200


async def test_first_superuser_email_normalized(
    settings: Settings,
    session_factory: async_sessionmaker[AsyncSession],
    redis: object,
) -> None:
    typed = " Root@XN--EXMPLE-CUA.com"
    application = create_app(settings.model_copy(update={"FIRST_SUPERUSER": typed}))

    async with application.router.lifespan_context(application):
        transport = ASGITransport(app=application)
        async with AsyncClient(
            transport=transport, base_url="http://testserver"
        ) as client:
            login = await client.post(
                LOGIN_URL,
                data={
                    "username": typed,
                    "password": settings.FIRST_SUPERUSER_PASSWORD,
                },
            )

    async with session_factory() as session:
        stored = await session.scalar(
            select(User.email).where(User.is_superuser.is_(True))
        )
    assert login.status_code == 200, login.text
    assert stored == "Root@exämple.com"
