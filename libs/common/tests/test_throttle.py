"""The failure throttle against a real Redis, and the parsing of its settings."""

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from mensajero_common.keys import RedisKeys
from mensajero_common.settings import Settings
from mensajero_common.testing import free_port
from mensajero_common.throttle import (
    FailureLimit,
    FailureThrottle,
    InvalidLimitSettingError,
    client_address,
    counted_address,
    describe_item,
    parse_limit_setting,
)


def make_throttle(redis: Redis, settings: Settings, setting: str) -> FailureThrottle:
    return FailureThrottle(
        [
            FailureLimit("ip", parse_limit_setting("IP", setting)),
            FailureLimit("account", parse_limit_setting("ACCOUNT", "2/minute")),
        ],
        redis,
        settings.REDIS_URL,
        f"{settings.REDIS_KEY_PREFIX}:throttletest",
        name="test",
    )


def test_parse_reads_several_items() -> None:
    items = parse_limit_setting("LIMIT", "20/minute;200/hour")

    assert [describe_item(item) for item in items] == ["20/minute", "200/hour"]


def test_describe_item_writes_multiples() -> None:
    (item,) = parse_limit_setting("LIMIT", "100/2 hours")

    assert describe_item(item) == "100/2 hours"


@pytest.mark.parametrize("value", ["lots", "", "0/minute", "5/minute;0/hour"])
def test_parse_rejects_invalid_value(value: str) -> None:
    with pytest.raises(InvalidLimitSettingError, match="DEVICE_AUTH_FAILURES_PER_IP"):
        parse_limit_setting("DEVICE_AUTH_FAILURES_PER_IP", value)


def test_client_address_reads_scope() -> None:
    assert client_address({"client": ("203.0.113.9", 5123)}) == "203.0.113.9"
    assert client_address({"client": None}) == "unknown"
    assert client_address({}) == "unknown"


async def test_throttle_reached_after_failures(
    redis: Redis, settings: Settings
) -> None:
    throttle = make_throttle(redis, settings, "3/minute")
    client = {"ip": "203.0.113.1", "account": "a"}

    reached = [await throttle.record_failure(client) for _ in range(2)]
    before = await throttle.check(client)
    third = await throttle.record_failure(client)
    after = await throttle.check(client)

    assert reached[0] is None
    assert reached[1] is not None
    assert reached[1].scope == "account"
    assert before is not None
    assert before.scope == "account"
    assert third is not None
    assert third.scope == "ip"
    assert third.limit == "3/minute"
    assert after is not None
    assert after.scope == "ip"
    assert 1 <= after.retry_after_s <= 60


async def test_throttle_counts_each_identifier(
    redis: Redis, settings: Settings
) -> None:
    throttle = make_throttle(redis, settings, "10/minute")
    for _ in range(2):
        await throttle.record_failure({"ip": "203.0.113.1", "account": "a"})

    throttled = await throttle.check({"ip": "203.0.113.1", "account": "a"})
    other = await throttle.check({"ip": "203.0.113.1", "account": "b"})

    assert throttled is not None
    assert throttled.scope == "account"
    assert other is None


async def test_clear_forgets_one_scope(redis: Redis, settings: Settings) -> None:
    throttle = make_throttle(redis, settings, "2/minute")
    client = {"ip": "203.0.113.1", "account": "a"}
    for _ in range(2):
        await throttle.record_failure(client)

    await throttle.clear("account", "a")
    throttled = await throttle.check(client)

    assert throttled is not None
    assert throttled.scope == "ip"


async def test_unreachable_redis_fails_open(settings: Settings) -> None:
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    throttle = FailureThrottle(
        [FailureLimit("ip", parse_limit_setting("IP", "1/minute"))],
        unreachable,
        settings.REDIS_URL,
        RedisKeys(settings.REDIS_KEY_PREFIX).login_throttle_prefix,
        name="test",
    )
    client = {"ip": "203.0.113.1"}
    try:
        with capture_logs() as logs:
            recorded = [await throttle.record_failure(client) for _ in range(3)]
            checked = [await throttle.check(client) for _ in range(3)]
    finally:
        await unreachable.aclose()

    errors = [line for line in logs if line["log_level"] == "error"]
    assert recorded == [None, None, None]
    assert checked == [None, None, None]
    assert len(errors) == 1
    assert errors[0]["event"] == "failure not counted: Redis failed"
    assert errors[0]["throttle"] == "test"


@pytest.mark.parametrize(
    ("address", "counted"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("unknown", "unknown"),
    ],
)
def test_counted_address_groups_ipv6(address: str, counted: str) -> None:
    assert counted_address(address) == counted
