"""The REST API's rate limits, read from the RATE_LIMIT_* settings.

Each setting is in the notation of the `limits` package: "<count>/<period>" items
separated by ";" (e.g. "20/second;600/minute"), and a request must fit every item.
"""

from dataclasses import dataclass

from limits import RateLimitItem, parse_many

from mensajero_common.settings import Settings


class InvalidRateLimitSettingError(ValueError):
    """A RATE_LIMIT_* setting is not in the `limits` notation: a deployment error."""

    def __init__(self, setting: str, value: str) -> None:
        super().__init__(
            f"{setting} is {value!r}, which is not a rate limit; write one or more "
            "'<count>/<period>' items separated by ';', e.g. '20/second;600/minute'"
        )


@dataclass(frozen=True)
class RateLimitRule:
    # Namespace of the rule's counters in Redis.
    name: str
    items: tuple[RateLimitItem, ...]


def describe_item(item: RateLimitItem) -> str:
    """Write `item` back in the settings' notation, e.g. "20/second" or "100/2 hours"."""
    period = item.GRANULARITY.name
    if item.multiples == 1:
        return f"{item.amount}/{period}"
    return f"{item.amount}/{item.multiples} {period}s"


def _parse(setting: str, value: str) -> tuple[RateLimitItem, ...]:
    try:
        items = parse_many(value)
    except ValueError:
        raise InvalidRateLimitSettingError(setting, value) from None
    if not items:
        raise InvalidRateLimitSettingError(setting, value)
    return tuple(items)


@dataclass(frozen=True)
class RateLimitRules:
    # Every request of a user authenticated by a bearer token.
    per_user: RateLimitRule
    # Every request with a user API key, per key.
    per_api_key: RateLimitRule
    # Every request without valid credentials, per client IP address.
    per_ip: RateLimitRule
    # Login and sign-up attempts per client IP address, on top of the rule above.
    login_per_ip: RateLimitRule

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimitRules":
        """Parse the settings, or raise InvalidRateLimitSettingError naming the bad one."""
        return cls(
            per_user=RateLimitRule(
                "user", _parse("RATE_LIMIT_PER_USER", settings.RATE_LIMIT_PER_USER)
            ),
            per_api_key=RateLimitRule(
                "api_key",
                _parse("RATE_LIMIT_PER_API_KEY", settings.RATE_LIMIT_PER_API_KEY),
            ),
            per_ip=RateLimitRule(
                "ip", _parse("RATE_LIMIT_PER_IP", settings.RATE_LIMIT_PER_IP)
            ),
            login_per_ip=RateLimitRule(
                "login",
                _parse("RATE_LIMIT_LOGIN_PER_IP", settings.RATE_LIMIT_LOGIN_PER_IP),
            ),
        )
