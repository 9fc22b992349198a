"""Index builds and drops that migrations run while the services keep writing."""

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op


def drop_index_concurrently(table: str, name: str) -> None:
    """Drop an index if it exists, without blocking the table's writes."""
    op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def create_index_concurrently(
    table: str, name: str, columns: list[str], predicate: str | None = None
) -> None:
    """Build an index without blocking the table's writes.

    A failed concurrent build leaves an invalid index behind, so a retry drops it first.
    """
    drop_index_concurrently(table, name)
    op.create_index(
        name,
        table,
        columns,
        unique=False,
        postgresql_concurrently=True,
        postgresql_where=sa.text(predicate) if predicate else None,
    )


@contextmanager
def concurrent_block() -> Iterator[None]:
    """Run the block outside a transaction, with no lock timeout.

    CONCURRENTLY lets sends and reports write while an index builds, and cannot run in a
    transaction. It waits for every transaction older than the build, such as a
    pg_dump's, which the environment's lock timeout would turn into a failed migration.
    Its own lock blocks no read or write, so the wait harms nothing.
    """
    with op.get_context().autocommit_block():
        previous = op.get_bind().exec_driver_sql("SHOW lock_timeout").scalar()
        op.execute("SET lock_timeout = 0")
        try:
            yield
        finally:
            op.execute(f"SET lock_timeout = '{previous}'")
