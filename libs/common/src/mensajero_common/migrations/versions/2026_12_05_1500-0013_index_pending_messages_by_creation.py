"""Index pending messages, and those waiting for a retry, on (created_at, id).

The dispatcher's sweeps page through pending messages oldest first, 100 at a time: the
messages that a device can take, and the retries whose delay has passed. Without an index
in that order, each page read and sorted every pending message. With 30,000 pending
messages behind 150,000 delivered ones, a page of the first sweep took 64 ms and one of
the second 17 ms, so a sweep through a backlog read it once per page. With these partial
indexes, a page took 0.9 and 0.3 ms (EXPLAIN ANALYZE of each page, see "Round seven" in
docs/benchmarks.md). The second index contains only retries, so the retry sweep skips the
messages that were never tried.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_smsmessage_created_at_id_pending": "status = 'pending'",
    "ix_smsmessage_created_at_id_retry": (
        "status = 'pending' AND next_attempt_at IS NOT NULL"
    ),
}


def _drop_indexes() -> None:
    for name in INDEXES:
        op.drop_index(
            name, table_name="smsmessage", postgresql_concurrently=True, if_exists=True
        )


def upgrade() -> None:
    # CONCURRENTLY lets sends and reports write while the indexes build. It cannot run
    # in a transaction, and a failed build leaves an invalid index behind, so a retry
    # drops that first.
    with op.get_context().autocommit_block():
        _drop_indexes()
        for name, predicate in INDEXES.items():
            op.create_index(
                name,
                "smsmessage",
                ["created_at", "id"],
                unique=False,
                postgresql_concurrently=True,
                postgresql_where=sa.text(predicate),
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_indexes()
