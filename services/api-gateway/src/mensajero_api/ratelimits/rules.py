"""The REST API's rate limits, read from the RATE_LIMIT_* settings.

Each setting is in the notation of the `limits` package: "<count>/<period>" items
separated by ";" (e.g. "20/second;600/minute"), and a request must fit every item.
"""

from dataclasses import dataclass

from limits import RateLimitItem

from mensajero_common.settings import Settings
from mensajero_common.throttle import parse_limit_setting


@dataclass(frozen=True)
class RateLimitRule:
    # Namespace of the rule's counters in Redis.
    name: str
    items: tuple[RateLimitItem, ...]


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
    # Requests whose X-API-Key failed authentication, per client IP address, with the
    # items of RATE_LIMIT_PER_IP.
    api_key_failures_per_ip: RateLimitRule

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimitRules":
        """Parse the settings, or raise InvalidLimitSettingError naming the bad one."""
        per_ip_items = parse_limit_setting(
            "RATE_LIMIT_PER_IP", settings.RATE_LIMIT_PER_IP
        )
        return cls(
            per_user=RateLimitRule(
                "user",
                parse_limit_setting(
                    "RATE_LIMIT_PER_USER", settings.RATE_LIMIT_PER_USER
                ),
            ),
            per_api_key=RateLimitRule(
                "api_key",
                parse_limit_setting(
                    "RATE_LIMIT_PER_API_KEY", settings.RATE_LIMIT_PER_API_KEY
                ),
            ),
            per_ip=RateLimitRule("ip", per_ip_items),
            login_per_ip=RateLimitRule(
                "login",
                parse_limit_setting(
                    "RATE_LIMIT_LOGIN_PER_IP", settings.RATE_LIMIT_LOGIN_PER_IP
                ),
            ),
            api_key_failures_per_ip=RateLimitRule("api_key_failure", per_ip_items),
        )
