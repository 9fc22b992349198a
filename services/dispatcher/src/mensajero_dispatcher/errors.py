"""Classification of failures into transient ones and faults of the data."""

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

_TRANSIENT_TYPES = (
    OSError,  # includes TimeoutError and a refused or reset connection
    RedisConnectionError,
    RedisTimeoutError,
    OperationalError,
    InterfaceError,
)

# SQLSTATE classes in which the server or the connection is at fault, not the statement.
# They are 08 connection exception, 28 invalid authorization, 3D invalid catalog name
# (database missing), 40 transaction rollback (deadlock, serialization), 53 insufficient
# resources and 57 operator intervention (shutdown, statement timeout), as listed in
# appendix A "PostgreSQL Error Codes" of the PostgreSQL manual.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "40", "53", "57"})


def is_transient(error: BaseException) -> bool:
    """Tell whether `error` comes from an unavailable Postgres or Redis.

    Work that failed this way is retried unchanged later. Any other error is a fault of
    one message or event, so retrying it unchanged would fail the same way.
    """
    if isinstance(error, _TRANSIENT_TYPES):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
