"""Monthly quota periods: a period starts at midnight UTC on QUOTA_RESET_DAY.

A quota row whose `last_reset_date` is before the start of the current period still
counts the SMS of an earlier period, so it is reset (to 0, with `last_reset_date` set to
today's UTC date) before anything reads or charges it. The dispatcher's reset job does
the same for every row.
"""

from datetime import UTC, date, datetime


def current_period_start(now: datetime, reset_day: int) -> date:
    """Return the date of the latest reset boundary at or before `now` (in UTC).

    `reset_day` is at most 28 (a setting bound), so every month has that day.
    """
    today = now.astimezone(UTC).date()
    if today.day >= reset_day:
        return date(today.year, today.month, reset_day)
    if today.month == 1:
        return date(today.year - 1, 12, reset_day)
    return date(today.year, today.month - 1, reset_day)


def next_quota_reset(now: datetime, reset_day: int) -> datetime:
    """Return the next midnight UTC on day `reset_day` of a month, strictly after `now`'s day.

    On the reset day itself the counters were reset at midnight, so the next reset is a
    month later.
    """
    start = current_period_start(now, reset_day)
    if start.month == 12:
        return datetime(start.year + 1, 1, reset_day, tzinfo=UTC)
    return datetime(start.year, start.month + 1, reset_day, tzinfo=UTC)


def utc_today(now: datetime) -> date:
    return now.astimezone(UTC).date()
