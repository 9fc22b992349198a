"""Classification of failures into transient ones and faults of the data.

The dispatcher retries work that failed transiently, unchanged, later. The API returns
503 `service_unavailable` with Retry-After for it instead of a 500.
"""

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

_TRANSIENT_TYPES = (
    OSError,  # includes TimeoutError and a refused or reset connection
    RedisConnectionError,
    RedisTimeoutError,
    OperationalError,
    InterfaceError,
    PoolTimeoutError,  # no pooled connection came free in time
)

# SQLSTATE classes in which the server or the connection is at fault, not the statement.
# They are 08 connection exception, 28 invalid authorization, 3D invalid catalog name
# (database missing), 40 transaction rollback (deadlock, serialization), 53 insufficient
# resources and 57 operator intervention (shutdown, statement timeout), as listed in
# appendix A "PostgreSQL Error Codes" of the PostgreSQL manual.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "40", "53", "57"})

# How far down an error's chain of causes to look for a transient one.
_MAX_CAUSES = 4


def is_transient(error: BaseException) -> bool:
    """Tell whether `error` comes from an unavailable Postgres or Redis.

    Work that failed this way is retried unchanged later. Any other error is a fault of
    one message or event, so retrying it unchanged would fail the same way. Errors of
    asyncpg used directly (a SQLSTATE of their own) and SQLAlchemy's wrappers of them
    are both recognized.
    """
    cause: BaseException | None = error
    for _ in range(_MAX_CAUSES):
        if cause is None:
            return False
        if isinstance(cause, _TRANSIENT_TYPES):
            return True
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES:
            return True
        cause = cause.orig if isinstance(cause, DBAPIError) else cause.__cause__
    return False
