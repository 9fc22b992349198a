import pytest
from pydantic import ValidationError

from mensajero_common.settings import Settings, describe_validation_error


def test_settings_reject_default_secret_in_production() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(
            _env_file=None,
            ENVIRONMENT="production",
            FIRST_SUPERUSER_PASSWORD="a-real-password",
        )

    assert "SECRET_KEY" in describe_validation_error(caught.value)


@pytest.mark.parametrize(
    ("secret_key", "password", "named"),
    [
        ("", "a-real-password", "SECRET_KEY"),
        ("secret", "a-real-password", "SECRET_KEY"),
        ("s" * 31, "a-real-password", "SECRET_KEY"),
        ("s" * 32, "a", "FIRST_SUPERUSER_PASSWORD"),
        ("s" * 32, "1234567", "FIRST_SUPERUSER_PASSWORD"),
    ],
)
def test_settings_reject_weak_secrets_in_production(
    secret_key: str, password: str, named: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(
            _env_file=None,
            ENVIRONMENT="production",
            SECRET_KEY=secret_key,
            FIRST_SUPERUSER_PASSWORD=password,
        )

    assert named in describe_validation_error(caught.value)


def test_settings_accept_strong_secrets_in_production() -> None:
    settings = Settings(
        _env_file=None,
        ENVIRONMENT="production",
        SECRET_KEY="s" * 32,
        FIRST_SUPERUSER_PASSWORD="p" * 8,
    )

    assert settings.is_production


def test_settings_allow_default_secret_in_development() -> None:
    settings = Settings(_env_file=None, ENVIRONMENT="development")

    assert settings.SECRET_KEY == "changethis"


def test_settings_name_invalid_value() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, WEBSOCKET_HEARTBEAT_TIMEOUT="soon")

    assert "invalid setting WEBSOCKET_HEARTBEAT_TIMEOUT" in describe_validation_error(
        caught.value
    )


def test_settings_webhook_private_urls_follow_environment() -> None:
    production = Settings(
        _env_file=None,
        ENVIRONMENT="production",
        SECRET_KEY="s" * 40,
        FIRST_SUPERUSER_PASSWORD="p" * 12,
    )

    assert production.webhook_private_urls_allowed is False
    assert Settings(_env_file=None).webhook_private_urls_allowed is True


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("", ""),
        ("*", "*"),
        (" 10.0.0.0/8 , 172.16.0.0/12,::1", "10.0.0.0/8,172.16.0.0/12,::1"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_forwarded_allow_ips_accepts_addresses(value: str, stored: str) -> None:
    trusted = Settings(_env_file=None, FORWARDED_ALLOW_IPS=value).FORWARDED_ALLOW_IPS

    assert trusted == stored


@pytest.mark.parametrize(
    "value", ["10.0.0.1/8", "proxy.local", "*,10.0.0.0/8", "10.0.0.0/8,", "10.0.0.0/33"]
)
def test_forwarded_allow_ips_rejects_invalid(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, FORWARDED_ALLOW_IPS=value)

    assert "invalid setting FORWARDED_ALLOW_IPS" in describe_validation_error(
        caught.value
    )
